"""The paths the LLaDA-8B-Instruct commands of the README take, run through LLaDA's own modeling code: a tiny
random LLaDA built from the vendored hub files (tests/llada/, conftest.build_tiny_llada), with the real
classes, vocabulary and special-token ids."""
import argparse
import json
import os

import pytest
import torch

import igpo
import sft

LLADA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}  # per block
OFFICIAL_TARGETS = {"q_proj", "k_proj", "v_proj", "up_proj"}  # the official list's names that exist in LLaDA


def llada_batch(tokenizer, G=2, L=8, seed=0):
    """Two prompts of different lengths (token-id lists) and random completions of ordinary characters."""
    qs = ["What is 2+3?", "Tom has 12 apples and eats 5. How many are left?"]
    prompts = [tokenizer(sft.make_prompt(tokenizer, q, False), add_special_tokens=False).input_ids for q in qs]
    completions = torch.randint(0, 96, (len(qs) * G, L), generator=torch.Generator().manual_seed(seed))
    return prompts, completions


def loss_and_grads(model, facts, prompts, completions):
    model.zero_grad(set_to_none=True)
    logp = igpo.token_logps(model, prompts, completions, facts)
    loss, _, _ = igpo.grpo_loss(logp, logp.detach() - 0.05, logp.detach() + 0.05, torch.linspace(-1, 1, logp.shape[0]),
                                torch.ones_like(logp, dtype=torch.bool), 0.2, 0.01)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_ckpt_on_llada_recomputes_blocks_with_same_grads(tiny_llada):
    """Issue 13.1: --grad_ckpt used to stop LLaDA at startup (no supports_gradient_checkpointing)."""
    plain, tok, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    ckpt, _, _ = sft.load_model(tiny_llada, trust_remote_code=True)
    sft.enable_grad_ckpt(ckpt)
    calls = []
    # a pre-hook: the recompute in backward stops early, so a forward (post-)hook would not see it
    ckpt.model.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    prompts, completions = llada_batch(tok)
    loss0, grads0 = loss_and_grads(plain.train(), facts, prompts, completions)
    loss1, grads1 = loss_and_grads(ckpt.train(), facts, prompts, completions)
    assert len(calls) == 4  # two prompt lengths, two forward passes: block 0 ran again for each in backward
    assert torch.allclose(loss0, loss1, atol=1e-6) and grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-6), n


@pytest.mark.parametrize("targets", [None, tuple(LLADA_PROJECTIONS)])
def test_lora_on_llada_targets_and_never_the_head(tiny_llada, targets):
    """The default trains what the official code trains (the four of its seven names that exist in LLaDA);
    --lora_targets reaches all seven block projections. The name ff_out also matches the vocabulary head
    model.transformer.ff_out, which is never adapted."""
    model, _, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    cfg, r = model.config, 4
    lora = sft.add_lora(model, r, 8, targets or facts.lora_targets)
    adapted = {n.split(".")[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert adapted == (set(targets) if targets else OFFICIAL_TARGETS)
    assert not hasattr(lora.get_output_embeddings(), "lora_A")
    # per block: q k v attn_out are d -> d, ff_proj and up_proj d -> h, ff_out h -> d (kv heads = heads here)
    d, h = cfg.d_model, cfg.mlp_hidden_size
    per_block = 4 * 2 * d + 3 * (d + h) if targets else 3 * 2 * d + (d + h)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == cfg.n_layers * r * per_block


# MetaMathQA rows in their exact shapes (query, response, type), as the hub dataset holds them
METAMATH_ROWS = [
    {"query": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May?",
     "response": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
                 "\n#### 72\nThe answer is: 72", "type": "GSM_AnsAug"},
    {"query": "What is the value of $\\sqrt{36 \\times \\sqrt{16}}$?",
     "response": "We have $\\sqrt{36 \\times \\sqrt{16}} = \\sqrt{36 \\times 4} = \\sqrt{144} = \\boxed{12}$."
                 "\nThe answer is: 12", "type": "MATH_AnsAug"},
    {"query": "What is the value of $\\sqrt{36 \\times \\sqrt{16}}$?",  # a second row for the same query
     "response": "$\\sqrt{16} = 4$, so $\\sqrt{36 \\cdot 4} = \\sqrt{144} = \\boxed{12}$.\nThe answer is: 12",
     "type": "MATH_AnsAug"},
    {"query": "If Natalia sold x clips in April and half as many in May, 72 in all, what is x?",
     "response": "x + x/2 = 72, so x = 48.\n#### 48\nThe answer is: 48", "type": "GSM_FOBAR"},
]


def test_hints_never_reveal_the_answer_of_metamath_rows(tiny_llada):
    """Issue 13.5: the hintable part was cut at the LAST answer marker, so GSM_AnsAug's '#### 72' and
    MATH_AnsAug's '\\boxed{12}' stayed hintable; a sample that merely keeps them was rewarded."""
    import eval as evaluation
    _, tok, _ = sft.load_model(tiny_llada, trust_remote_code=True)
    for row in METAMATH_ROWS[:2]:
        gold = igpo.answer_from_trace(row["response"])
        assert gold in ("72", "12")
        hintable = tok.decode(igpo.hintable_trace_ids(tok, row["response"], 256))
        assert row["response"].startswith(hintable) and len(hintable) > 30  # the reasoning is still hintable
        assert "####" not in hintable and "boxed" not in hintable and "answer" not in hintable
        # a completion that is the whole hint source revealed, then the end token, earns nothing
        assert not evaluation.grade(hintable + "<|eot_id|>", gold, "math500")


def test_inpainting_a_long_trace_leaves_room_for_the_answer(tiny_llada):
    """Issue 31.3: the hintable ids were cut at L, so a trace of L tokens or more could be revealed up to the
    canvas's last position and an inpainted sample had no room left for its \\boxed{}. Hints now stop
    ceil(30/256 * L) positions before the end (the official code keeps 30 of 256 free), and reach up to there."""
    _, tok, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    steps = "".join(f"Step {k}: we add {k} apples to the {k * k} we had, which gives {k * k + k} apples.\n"
                    for k in range(1, 12))  # a long MATH_AnsAug-shaped response, one token per character
    trace = steps + "So the total is $\\boxed{132}$.\nThe answer is: 132"
    assert len(tok(steps, add_special_tokens=False).input_ids) > 256
    for L, room in [(256, 30), (48, 6), (20, 3)]:  # ceil: 5.625 -> 6 and 2.34 -> 3, never fewer
        args = argparse.Namespace(gen_length=L, num_generations=4, eta_low=1.0, eta_high=1.0, chunk_min=5,
                                  chunk_max=10)
        hints = igpo.hint_canvases(tok, [trace], args, facts.mask_id, torch.Generator().manual_seed(0))
        hinted = hints != facts.mask_id  # (G, L); eta = 1 reveals every hintable chunk
        assert not hinted[:, L - room:].any()  # the answer's room stays free of hints ...
        assert hinted[:, :L - room].all()  # ... and everything before it is revealed: no position more
        assert tok.decode(hints[0, :L - room]) == steps[:L - room]
    short = "Step 1: 3 + 4 = 7.\nThe answer is: 7"  # a short trace is hinted whole, as before
    hints = igpo.hint_canvases(tok, [short], argparse.Namespace(gen_length=256, num_generations=1, eta_low=1.0,
                               eta_high=1.0, chunk_min=5, chunk_max=10), facts.mask_id, torch.Generator())
    assert tok.decode(hints[0][hints[0] != facts.mask_id]) == "Step 1: 3 + 4 = 7.\n"


def test_metamath_official_selection(tmp_path):
    from datasets import Dataset
    ds = Dataset.from_list(METAMATH_ROWS)
    assert igpo.metamath_official(ds, "query") == [0, 1]  # AnsAug types only, first row per query
    with pytest.raises(SystemExit) as e:
        igpo.metamath_official(ds.remove_columns("type"), "query")
    assert str(e.value).startswith("error: ") and "'type'" in str(e.value)


def test_metamath_official_rows_are_read_in_memory(tmp_path):
    """igpo's data path with --metamath_official: the selected rows, each trace prefixed with the format the
    prompt asks for, the answer read off the trace; and no cache file written next to the data's, which every
    rank under torchrun would write at once."""
    data = tmp_path / "metamath.jsonl"
    rows = [METAMATH_ROWS[0], METAMATH_ROWS[3], METAMATH_ROWS[1]]  # rows 0 and 2 kept: not a contiguous range
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = igpo.get_args(["--dataset", str(data), "--question_col", "query", "--trace_col", "response",
                          "--metamath_official"])
    cache = os.path.dirname(sft.load_rows(str(data), "train", []).cache_files[0]["filename"])
    before = set(os.listdir(cache))
    rows = igpo.load_rl_data(args)
    assert [(q, t) for q, t, _ in rows] == [(r["query"], "<reasoning>\n" + r["response"]) for r in METAMATH_ROWS[:2]]
    assert [a for _, _, a in rows] == ["72", "12"] and set(os.listdir(cache)) == before


def lora_delta(folder, module):
    """The weight change an adapter folder applies to one module: (alpha / r) B A."""
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    w = load_file(os.path.join(folder, "adapter_model.safetensors"))
    a, b = (next(v for k, v in w.items() if k.endswith(f"{module}.lora_{x}.weight")) for x in "AB")
    return cfg["lora_alpha"] / cfg["r"] * b @ a


def test_lora_on_lora_chain_keeps_the_sft_stage(tiny_llada, tmp_path):
    """Issue 13.2: an IGPO adapter trained on an SFT adapter must record the SFT folder as its base, so that
    loading the IGPO output gives base + SFT + IGPO. Both stages are saved the way sft.py / igpo.py save them;
    loaded, the adapters stay separate (stacked) modules, and merged they are the sum of the deltas."""
    def train_adapter(init, out, seed):  # add_lora + nonzero adapter weights + save_checkpoint, as the scripts do
        model, tok, facts = sft.load_model(init, trust_remote_code=True)
        model = sft.add_lora(model, 4, 8, facts.lora_targets)
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.5)
        sft.save_checkpoint(str(out), model, tok, argparse.Namespace(), None)
    train_adapter(tiny_llada, tmp_path / "sft", 1)
    train_adapter(str(tmp_path / "sft"), tmp_path / "igpo", 2)
    igpo_config = json.load(open(tmp_path / "igpo" / "adapter_config.json"))
    assert igpo_config["base_model_name_or_path"] == str(tmp_path / "sft")  # the SFT folder, not the raw base
    module = "model.transformer.blocks.0.q_proj"
    base = sft.load_model(tiny_llada, trust_remote_code=True)[0].get_submodule(module).weight
    merged, tok, _ = sft.load_model(str(tmp_path / "igpo"), trust_remote_code=True, merge=True)
    d_sft, d_igpo = lora_delta(tmp_path / "sft", "blocks.0.q_proj"), lora_delta(tmp_path / "igpo", "blocks.0.q_proj")
    assert d_sft.abs().mean() > 1e-3 and d_igpo.abs().mean() > 1e-3  # both stages really change the weights
    assert torch.allclose(merged.get_submodule(module).weight, base + d_sft + d_igpo, atol=1e-5)
    stacked = sft.load_model(str(tmp_path / "igpo"), trust_remote_code=True)[0]  # what eval.py loads
    assert stacked.active_adapters == ["stage0", "stage1"] and not any(p.requires_grad for p in stacked.parameters())
    x = torch.tensor([tok("What is 2+3?").input_ids])
    with torch.no_grad():
        assert torch.allclose(stacked.eval()(x).logits, merged.eval()(x).logits, atol=1e-4)
        # a frozen stage has no dropout, also in train mode (it belongs to the model RL starts from)
        assert torch.equal(stacked.train()(x).logits, stacked(x).logits)


def test_eval_on_llada_is_batch_invariant(tiny_llada, tmp_path):
    """Issue 13.7: LLaDA's hub code ignores attention_mask, so a left-padded prompt's greedy answer changed with
    the rest of its batch. eval.py must give the same generations with --gen_batch 1 and 8."""
    import eval as evaluation
    data = tmp_path / "gsm.jsonl"
    qs = ["1+1?", "What is 2+3?", "What is 2+3?", "Tom has 12 apples and eats 5. How many?", "Is 7 > 3?", "1+1?"]
    data.write_text("".join(json.dumps({"question": q, "answer": f"x\n#### {i}"}) + "\n" for i, q in enumerate(qs)))
    gens = []
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        evaluation.main(["--model", tiny_llada, "--trust_remote_code", "--task", "gsm8k", "--data", str(data),
                         "--gen_length", "16", "--block_length", "8", "--diffusion_steps", "8", "--gen_batch", str(bs),
                         "--out_dir", str(out), "--device", "cpu"])
        gens.append([r["generations"] for r in json.load(open(out / "eval_gsm8k.json"))["generations"]])
    assert gens[0] == gens[1] and len(set(gens[0])) > 2  # same answers, and not a degenerate constant output
    assert gens[0][0] == gens[0][5] and gens[0][1] == gens[0][2]  # same prompt, same greedy answer


def test_rollout_rows_do_not_see_each_other(tiny_llada):
    """igpo.rollout on LLaDA: a prompt's samples do not depend on the other prompts of the batch (greedy)."""
    import eval as evaluation
    model, tok, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    prompts, _ = llada_batch(tok)
    sampler = evaluation.Sampler(16, 8, 8, 0.0)
    both = igpo.rollout(model.eval(), prompts, sampler, facts, None)
    for b in range(2):
        alone = igpo.rollout(model, prompts[b:b + 1], sampler, facts, None)
        assert torch.equal(both[b], alone[0])


SHORT_ROWS = [{"question": f"What is {a}+{b}?", "trace": f"{a}+{b}={a + b}\n\\boxed{{{a + b}}}"}
              for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


def sft_weights(tiny_llada, tmp_path, precision, extra=()):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SHORT_ROWS))
    out = tmp_path / f"sft_{precision}"
    sft.main(["--model", tiny_llada, "--trust_remote_code", "--dataset", str(data), "--gen_length", "16",
              "--batch_size", "1", "--max_steps", "3", "--lr", "1e-4", "--warmup_steps", "1", "--weight_decay", "0",
              "--precision", precision, "--out_dir", str(out), "--device", "cpu", "--log_every", "1", *extra])
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors")), out


def test_bf16_policy_moves_weights_like_fp32(tiny_llada, tmp_path, capsys):
    """Issue 13.4: the GPU policy (bf16 autocast, fp32 trained weights), run on CPU, must move the weights as
    fp32 does; pure bf16 weights, what igpo.py trained on a GPU before, lose most updates to rounding."""
    from safetensors.torch import load_file
    w0 = load_file(os.path.join(tiny_llada, "model.safetensors"))
    w32, _ = sft_weights(tiny_llada, tmp_path, "fp32")
    wbf, out = sft_weights(tiny_llada, tmp_path, "bf16")
    printed = capsys.readouterr().out
    assert "precision: weights float32, compute bfloat16 autocast" in printed  # at start
    name = "model.transformer.blocks.0.q_proj.weight"
    assert wbf[name].dtype == torch.float32  # the master weights stayed fp32
    d32, dbf = w32[name] - w0[name], wbf[name] - w0[name]
    assert (dbf != 0).float().mean() > 0.99  # every weight moved ...
    assert torch.nn.functional.cosine_similarity(d32.flatten(), dbf.flatten(), dim=0) > 0.9  # ... as under fp32
    # the bug: the same fp32 update applied to bf16 weights rounds away for most of them
    assert ((w0[name].bfloat16() + d32.bfloat16()) != w0[name].bfloat16()).float().mean() < 0.5
    # resume restores the same precision: the continued run still saves fp32 weights
    wres, _ = sft_weights(tiny_llada, tmp_path, "bf16", ["--resume", "--max_steps", "4"])
    assert wres[name].dtype == torch.float32 and not torch.equal(wres[name], wbf[name])


def test_full_fine_tuning_checkpoint_is_evaluated_with_its_fp32_weights(tiny_llada, tmp_path, capsys):
    """Issue 31.4: eval.py loaded every checkpoint in bf16 under the GPU policy, so a full fine-tuning run's
    fp32 weights were rounded before evaluation. They are evaluated as trained now: fp32 weights, bf16 compute,
    the very tokens the trainer's policy writes; a frozen model (no args.json: a hub model) stays bf16."""
    import eval as evaluation
    _, out = sft_weights(tiny_llada, tmp_path, "bf16")
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": r["question"], "answer": "7"}) + "\n" for r in SHORT_ROWS))
    flags = ["--trust_remote_code", "--task", "math500", "--data", str(data), "--gen_length", "16", "--block_length",
             "8", "--diffusion_steps", "8", "--precision", "bf16", "--device", "cpu"]
    capsys.readouterr()
    evaluation.main(["--model", str(out), "--out_dir", str(tmp_path / "e"), *flags])
    assert "precision: weights float32, compute bfloat16 autocast" in capsys.readouterr().out
    policy, tok, facts = sft.load_model(str(out), trust_remote_code=True, dtype=torch.float32)  # as trained
    items = evaluation.load_task("math500", str(data))
    sampler = evaluation.Sampler(16, 8, 8, 0.0, True, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        records, _ = evaluation.evaluate(policy, tok, facts, items, "math500", sampler)
    saved = json.load(open(tmp_path / "e" / "eval_math500.json"))["generations"]
    assert [r["generations"] for r in saved] == [r["generations"] for r in records]
    evaluation.main(["--model", tiny_llada, "--out_dir", str(tmp_path / "hub"), *flags])
    assert "precision: weights bfloat16, compute bfloat16 autocast" in capsys.readouterr().out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_command(script, which="LLaDA", **changes):
    """The README's command for `script` on `which` model (LLaDA or Dream), as written, with the flags in `changes`
    replaced (or added)."""
    import shlex
    line = next(l for l in open(os.path.join(ROOT, "README.md")) if l.startswith(f"python {script} ")
                and "--trust_remote_code" in l and which.lower() in l.lower())
    argv = shlex.split(line)[2:]
    for flag, value in changes.items():
        flag = "--" + flag
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        else:
            argv += [flag, str(value)]
    return argv


def test_the_papers_settings_in_the_defaults_and_the_readme_commands():
    """The paper's settings (NOTES.md §3 items 10 and 12; lambda = 1/2 from Eq. (11)): the embedded defaults
    keep every one that does not depend on scale, and the README's igpo.py commands (LLaDA, Dream) carry all
    of them, with 64 prompts of G = 8 per optimizer step; its sft.py commands train the paper's LoRA."""
    kept = dict(num_generations=8, epsilon=0.2, temperature=1.2, max_replace_frac=0.5, entropy_keep=0.2,
                beta=0.01, eta_low=0.2, eta_high=0.6, weight_decay=0.1, grad_clip=0.2)
    default = vars(igpo.get_args([]))
    assert {k: default[k] for k in kept} == kept
    paper = dict(kept, gen_length=256, block_length=32, diffusion_steps=128, batch_prompts=64, num_iterations=4,
                 lr=5e-7, warmup_steps=50, chunk_min=5, chunk_max=10, lora_r=128, lora_alpha=64)
    for which in ("LLaDA", "Dream"):
        readme = vars(igpo.get_args(readme_command("igpo.py", which)))
        assert {k: readme[k] for k in paper} == paper and readme["metamath_official"], which
        readme_sft = vars(sft.get_args(readme_command("sft.py", which)))
        assert (readme_sft["lora_r"], readme_sft["lora_alpha"], readme_sft["gen_length"]) == (128, 64, 256), which


def readme_rewrites(rows):
    """The rewrites cache's lines for OpenR1-shaped rows whose concise rewrites are SHORT_ROWS' traces, as the
    README's --rewrite_model (the same in its LLaDA and Dream lines) would have written them."""
    rewriter = sft.get_args(readme_command("sft.py")).rewrite_model
    assert rewriter == sft.get_args(readme_command("sft.py", "Dream")).rewrite_model
    return [{"model": rewriter, "question": r["problem"], "trace": r["solution"], "rewrite": s["trace"]}
            for r, s in zip(rows, SHORT_ROWS)]


def chain_data(tmp_path, sft_out):
    # The three files the README chains read: OpenR1-Math rows (SFT), MetaMathQA rows (IGPO), a MATH500 file (eval).
    # The SFT run finds every rewrite of its rows in its cache already (the concise traces of SHORT_ROWS), so the
    # README's --rewrite_model is never loaded; the filter still reads each one.
    traces, metamath, bench = tmp_path / "traces.jsonl", tmp_path / "metamath.jsonl", tmp_path / "math500.jsonl"
    rows = [{"problem": r["question"], "solution": "First, " + r["trace"]} for r in SHORT_ROWS]  # the long ones
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.makedirs(sft_out)
    with open(os.path.join(sft_out, "rewrites.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in readme_rewrites(rows))
    metamath.write_text("".join(json.dumps(r) + "\n" for r in METAMATH_ROWS))
    bench.write_text("".join(json.dumps({"problem": r["question"], "answer": r["trace"][-2]}) + "\n"
                             for r in SHORT_ROWS))
    return traces, metamath, bench


@pytest.mark.slow
def test_readme_llada_chain_sft_igpo_eval(tiny_llada, tmp_path, capsys):
    """The README's paper-scale commands (sft.py -> igpo.py -> eval.py with --trust_remote_code --lora_r
    --grad_ckpt) run as written on the tiny LLaDA, model path, data and sizes aside, under the GPU precision
    policy; the model eval.py loads at the end is base + SFT adapter + IGPO adapter (issue 13.2)."""
    import eval as evaluation
    sft_out, igpo_out = str(tmp_path / "sft_llada"), str(tmp_path / "igpo_llada")
    traces, metamath, bench = chain_data(tmp_path, sft_out)
    sft.main(readme_command("sft.py", model=tiny_llada, dataset=traces, gen_length=16, grad_accum=2, lr=1e-2,
                            warmup_steps=1, max_steps=1, out_dir=sft_out, precision="bf16"),
             same_answer=evaluation.same_answer)
    igpo.main(readme_command("igpo.py", model=sft_out, dataset=metamath, gen_length=32, block_length=16, diffusion_steps=8,
                             num_generations=2, batch_prompts=2, grad_accum=2, num_iterations=2, gen_batch=4,
                             warmup_steps=1, max_steps=1, out_dir=igpo_out, precision="bf16"))
    evaluation.main(readme_command("eval.py", model=igpo_out, data=bench, gen_length=32, block_length=16, diffusion_steps=8,
                                   out_dir=tmp_path, precision="bf16"))
    printed = capsys.readouterr().out
    assert printed.count("precision: weights bfloat16") == 3  # the policy line of all three scripts
    assert "rewrite: 4 traces rewritten (4 from the cache), 4 kept" in printed
    assert len(json.load(open(tmp_path / "eval_math500.json"))["generations"]) == len(SHORT_ROWS)
    assert json.load(open(os.path.join(igpo_out, "adapter_config.json")))["base_model_name_or_path"] == sft_out
    module = "model.transformer.blocks.1.up_proj"
    base = sft.load_model(tiny_llada, trust_remote_code=True)[0].get_submodule(module).weight
    final = sft.load_model(igpo_out, trust_remote_code=True, merge=True)[0].get_submodule(module).weight
    d_sft, d_igpo = lora_delta(sft_out, "blocks.1.up_proj"), lora_delta(igpo_out, "blocks.1.up_proj")
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(os.path.join(sft_out, "adapter_model.safetensors")).values()} == {torch.float32}
    assert d_sft.abs().mean() > 1e-4  # SFT moved the weights, and that move survives into the final model
    assert torch.allclose(final, base + d_sft + d_igpo, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# What was trained is what is evaluated (issue 20): adapters under the GPU precision policy, and no padding.

def sub_bf16_step_adapter(tiny_llada, out, frac=0.4):
    """An adapter on the default targets whose every weight change is `frac` of half a bf16 step of the weight
    it changes (random signs): merged into bf16 weights, all of it rounds away. Saved as sft.py saves one."""
    model, tok, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    lora = sft.add_lora(model, 32, 32, facts.lora_targets)  # r = d_model: any delta is a rank-r product
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora.modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                W = m.base_layer.weight  # (d_out, d_in), d_in = 32 for every default target
                half_step = 2.0 ** (torch.floor(torch.log2(W.bfloat16().float().abs())) - 8)
                delta = frac * half_step * (torch.randint(0, 2, W.shape, generator=g) * 2 - 1)
                m.lora_A["default"].weight.copy_(torch.eye(32))
                m.lora_B["default"].weight.copy_(delta / m.scaling["default"])
                assert ((W.bfloat16() + delta).bfloat16() == W.bfloat16()).all()  # below half a step, all of it
    sft.save_checkpoint(str(out), lora, tok, argparse.Namespace(), None)
    return lora.eval(), tok, facts


def forward_logits(model, x, bf16):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(x).logits.float()


def test_bf16_load_evaluates_the_trained_adapter(tiny_llada, tmp_path):
    """Loaded with bf16 weights (the GPU policy), an adapter whose change is below half a bf16 step of every
    weight used to be merged into those weights, where it rounded away: eval.py evaluated the start model.
    Loaded as a separate fp32 module it gives exactly the outputs of the policy that was trained (same weights,
    same computation), and in fp32 exactly the fp32 change. Under bf16 compute, a change this small is below the
    computation's own rounding (NOTES.md §7): what survives is what training saw, no less."""
    trained, tok, facts = sub_bf16_step_adapter(tiny_llada, tmp_path / "adapter")
    x = torch.tensor([tok(sft.make_prompt(tok, "Tom has 12 apples and eats 5. How many?", False)).input_ids])
    for dtype in (torch.bfloat16, torch.float32):  # the GPU policy's load, and the fp32 one
        policy = sft.load_model(tiny_llada, trust_remote_code=True, dtype=dtype)[0]  # as the trainer holds it
        policy = sft.add_lora(policy, 32, 32, facts.lora_targets)
        policy.load_state_dict(trained.state_dict(), strict=False)  # the trained adapter, the base in `dtype`
        loaded = sft.load_model(str(tmp_path / "adapter"), trust_remote_code=True, dtype=dtype)[0]
        base = sft.load_model(tiny_llada, trust_remote_code=True, dtype=dtype)[0]
        bf16 = dtype == torch.bfloat16
        assert torch.equal(forward_logits(loaded.eval(), x, bf16), forward_logits(policy.eval(), x, bf16))
        assert not torch.equal(forward_logits(loaded, x, bf16), forward_logits(base.eval(), x, bf16))
    change = forward_logits(loaded, x, False) - forward_logits(base, x, False)  # fp32: the whole update
    assert torch.allclose(change, forward_logits(trained, x, False) - forward_logits(base, x, False), atol=1e-4)
    # the old load path: the same adapter merged into bf16 weights changes nothing at all
    merged = sft.load_model(str(tmp_path / "adapter"), trust_remote_code=True, dtype=torch.bfloat16, merge=True)[0]
    base16 = sft.load_model(tiny_llada, trust_remote_code=True, dtype=torch.bfloat16)[0]
    assert torch.equal(forward_logits(merged.eval(), x, True), forward_logits(base16.eval(), x, True))


def test_estimator_and_sft_loss_do_not_see_other_prompts(tiny_llada):
    """LLaDA ignores attention_mask, so a left-padded prompt attended to pads that its rollout never saw and
    its log-probs, entropies and SFT loss depended on the other prompts of its micro-batch. No pad enters the
    model now: a prompt's numbers are the same alone as in a batch with longer and shorter prompts."""
    model, tok, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    model.eval()
    qs = ["What is 2+3?", "Tom has 12 apples and eats 5. How many are left?", "Is 7 > 3?"]
    prompts = [tok(sft.make_prompt(tok, q, False), add_special_tokens=False).input_ids for q in qs]
    assert len({len(p) for p in prompts}) == 3
    G, L = 2, 8
    completions = torch.randint(0, 96, (len(qs) * G, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp, entropy = igpo.token_logps(model, prompts, completions, facts, with_entropy=True)
        for b in range(len(qs)):
            alone, h = igpo.token_logps(model, prompts[b:b + 1], completions[b * G:(b + 1) * G], facts, True)
            assert torch.allclose(logp[b * G:(b + 1) * G], alone, atol=1e-5)
            assert torch.allclose(entropy[b], h[0], atol=1e-5)
        # Eq. (2) on the batch is the mean of each prompt's loss alone, for the same noise (t and mask draws)
        rows = [(p, list(c)) for p, c in zip(prompts, completions[::G].tolist())]
        t, u = torch.rand(3, 1), torch.rand(3, L)
        batch = sft_loss_with_draws(model, rows, facts, t, u)
        alone = [sft_loss_with_draws(model, rows[i:i + 1], facts, t[i:i + 1], u[i:i + 1]) for i in range(3)]
    assert torch.allclose(batch, sum(alone) / 3, atol=1e-5)


def sft_loss_with_draws(model, rows, facts, t, u):
    """sft.sft_loss with its two random draws (t, then the mask uniforms) replaced by the given tensors."""
    draws = iter([t, u])
    real = torch.rand
    torch.rand = lambda *a, **k: next(draws)
    try:
        return sft.sft_loss(model, rows, facts, torch.Generator())
    finally:
        torch.rand = real


@pytest.mark.parametrize("script", ["sft.py", "igpo.py", "eval.py"])
def test_script_headers_carry_the_readme_commands(script):
    """One source of truth for the paper-scale commands: each script's header is the README's LLaDA line, and
    the README's Dream line is the same command with the header's stated substitutions."""
    import re
    import shlex
    lines = open(os.path.join(ROOT, script)).read().split("\n#\n")[0].splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"#   python {script} --model") and "llada" in l.lower())
    block = []
    for line in lines[start:]:
        block.append(line.lstrip("# ").rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    header = shlex.split(" ".join(block))[2:]
    assert header == readme_command(script, "LLaDA")
    dream = dict(re.findall(r"(--\w+) (\S+?)[,)]?(?: and|,|$| \()",
                            next(l for l in lines if l.startswith("#   Dream-v0-Instruct-7B"))))
    expected = [dream.get(header[i - 1], a) if i and header[i - 1] in dream else a for i, a in enumerate(header)]
    assert readme_command(script, "Dream") == expected


def test_kv_cache_is_refused_with_one_line_on_llada_and_the_embedded_model(tiny_llada, tmp_path):
    """--kv_cache needs a forward that reuses a prefix's keys and values (sft.MODELS): LLaDA's hub code asserts
    that none is passed, the embedded ModernBERT takes none. Either is one line on stderr, exit 1, no traceback."""
    import subprocess
    import sys
    import eval as evaluation
    model, tok, facts = sft.load_model(tiny_llada, trust_remote_code=True)
    assert not facts.kv_cache
    with pytest.raises(SystemExit) as e:
        evaluation.generate(model, torch.tensor([[1, 2, 3]]), evaluation.Sampler(8, 8, 4, 0.0, kv_cache=True), facts)
    assert str(e.value).startswith("error: --kv_cache needs a model") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        igpo.main(["--model", "toy", "--kv_cache", "--out_dir", str(tmp_path / "o"), "--limit", "0",
                   "--max_steps", "1"])
    assert str(e.value).startswith("error: --kv_cache needs a model") and "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "eval.py", "--model", "toy", "--kv_cache", "--limit", "2", "--out_dir",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: --kv_cache needs a model") and r.stderr.count("\n") == 1
