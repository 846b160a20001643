"""Dream-v0-Instruct-7B by flags only, checked against Dream's own code: a tiny random Dream built from the
vendored hub files (tests/dream/, conftest.build_tiny_dream), with the real classes, vocabulary, special-token ids
and chat template. Dream differs from LLaDA in what sft.MODELS records: its mask and end tokens, LoRA target
names, and that the logits at position i - 1 predict token i (a forgotten shift is silent garbage)."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import eval as evaluation
import igpo
import sft
from test_llada import SHORT_ROWS, chain_data, readme_command

DREAM_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def dream_prompts(tok, questions=("What is 2+3?", "Tom has 12 apples and eats 5. How many are left?")):
    return [tok(sft.make_prompt(tok, q, False), add_special_tokens=False).input_ids for q in questions]


def test_facts_of_dream_come_from_the_table(tiny_dream):
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    assert type(model).__name__ == "DreamModel"
    assert facts.mask_id == tok.convert_tokens_to_ids("<|mask|>") == 151666
    assert facts.end_ids == (151645, 151643)  # <|im_end|> ends the turn, <|endoftext|> pads after it
    assert facts.shifted and set(facts.lora_targets) == DREAM_PROJECTIONS and facts.kv_cache
    # the head has 152,064 rows but the tokenizer decodes 151,667 ids: the sampler never draws the others
    assert model.get_output_embeddings().weight.shape[0] == 152064 and facts.n_tokens == len(tok) == 151667


def test_greedy_generation_equals_dreams_own_sampler(tiny_dream):
    """Where the two schedules coincide (one block, steps dividing L), eval.generate gives the tokens of Dream's
    own diffusion_generate: confidence = probability of the argmax, the k most confident committed, k = L/steps
    every step (Dream's schedule with eps = -1/(2(L+steps)); its default eps = 1e-3 commits one token less at the
    first step and the rest at the last), top_k off (the config's legacy default is 50), and the mask token never
    drawn. With the logit shift dropped, the tokens differ: this is the check that catches a forgotten shift."""
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    model.eval()
    x = torch.tensor(dream_prompts(tok, ["What is 2+3?", "What is 4+5?", "What is 7+1?"]))
    no_mask = lambda step, canvas, logits: logits.index_fill_(-1, torch.tensor([facts.mask_id]), float("-inf"))
    for L, steps in [(16, 8), (16, 16), (12, 4)]:
        ours = evaluation.generate(model, x, evaluation.Sampler(L, L, steps, 0.0, False), facts)
        theirs = model.diffusion_generate(x, max_new_tokens=L, steps=steps, alg="maskgit_plus", temperature=0.0,
                                          top_k=None, top_p=None, eps=-1 / (2 * (L + steps)),
                                          mask_token_id=facts.mask_id, generation_logits_hook_func=no_mask,
                                          return_dict_in_generate=True).sequences
        assert torch.equal(ours, theirs), (L, steps)
        unshifted = evaluation.generate(model, x, evaluation.Sampler(L, L, steps, 0.0, False),
                                        facts._replace(shifted=False))
        assert not torch.equal(unshifted, theirs)


def test_estimator_and_sft_loss_read_the_shifted_logits(tiny_dream):
    """Eq. (5) on Dream equals Dream's own shifted cross-entropy (model(x, labels).loss, which predicts the
    label at i from the logits at i - 1), and so does Eq. (2) with every response token masked."""
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    model.eval()
    prompts, L = dream_prompts(tok), 8
    completions = torch.randint(15, 25, (2, L), generator=torch.Generator().manual_seed(0))  # digits
    with torch.no_grad():
        logp = igpo.token_logps(model, prompts, completions, facts)  # G = 1
        for b, p in enumerate(prompts):
            x = torch.tensor([p + [facts.mask_id] * L])
            labels = torch.tensor([[-100] * len(p) + completions[b].tolist()])
            own = model(x, labels=labels).loss  # mean over the L labels
            assert torch.allclose(-logp[b].mean(), own, atol=1e-5)
            unshifted = igpo.token_logps(model, [p], completions[b:b + 1], facts._replace(shifted=False))
            assert not torch.allclose(-unshifted.mean(), own, atol=1e-3)
            # Eq. (2) with t -> 1 masks every response token: (1/L) sum CE / p, p = 1
            rows = [(p, completions[b].tolist())]
            draws = iter([torch.ones(1, 1), torch.zeros(1, L)])
            real, torch.rand = torch.rand, lambda *a, **k: next(draws)
            try:
                loss = sft.sft_loss(model, rows, facts, torch.Generator())
            finally:
                torch.rand = real
            assert torch.allclose(loss, own, atol=1e-5)


def test_lora_adapts_dreams_seven_projections_not_its_head(tiny_dream):
    model, _, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    lora = sft.add_lora(model, 4, 8, facts.lora_targets)
    adapted = {n.split(".")[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert adapted == DREAM_PROJECTIONS and not hasattr(lora.get_output_embeddings(), "lora_A")
    n_layers = model.config.num_hidden_layers
    assert len([m for m in lora.modules() if hasattr(m, "lora_A")]) == 7 * n_layers


def test_estimator_does_not_see_other_prompts_on_dream(tiny_dream):
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    model.eval()
    prompts = dream_prompts(tok, ["What is 2+3?", "Tom has 12 apples and eats 5. How many are left?", "Hi?"])
    completions = torch.randint(15, 25, (6, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = igpo.token_logps(model, prompts, completions, facts)
        for b in range(3):
            alone = igpo.token_logps(model, prompts[b:b + 1], completions[2 * b:2 * b + 2], facts)
            assert torch.allclose(logp[2 * b:2 * b + 2], alone, atol=1e-5)


def test_unknown_model_or_missing_token_is_a_one_line_error(tiny_dream, tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    tok = sft.build_toy_tokenizer()
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit) as e:  # a masked LM the table does not know: no guess at its conventions
        sft.load_model(str(tmp_path / "bert"))
    msg = str(e.value)
    assert msg.startswith("error: model_type 'bert' is not in sft.MODELS") and "\n" not in msg
    _, dream_tok, _ = sft.load_model(tiny_dream, trust_remote_code=True)
    with pytest.raises(SystemExit) as e:  # LLaDA's entry with Dream's tokenizer: LLaDA's mask token is missing
        sft.model_facts(SimpleNamespace(model_type="llada"), dream_tok)
    assert "no token <|mdm_mask|>" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_readme_dream_chain_sft_igpo_eval(tiny_dream, tmp_path, capsys):
    """The README's Dream commands run as written (model path, data and sizes aside) on the tiny Dream under
    the GPU precision policy: SFT with LoRA, IGPO stacking its adapter on SFT's, evaluation of the result."""
    sft_out, igpo_out = str(tmp_path / "sft_dream"), str(tmp_path / "igpo_dream")
    traces, metamath, bench = chain_data(tmp_path, sft_out)
    sft.main(readme_command("sft.py", "Dream", model=tiny_dream, dataset=traces, gen_length=16, grad_accum=2,
                            lr=1e-2, warmup_steps=1, max_steps=1, out_dir=sft_out, precision="bf16"),
             same_answer=evaluation.same_answer)
    igpo.main(readme_command("igpo.py", "Dream", model=sft_out, dataset=metamath, gen_length=32, block_length=16,
                             diffusion_steps=8, num_generations=2, batch_prompts=2, grad_accum=2, num_iterations=2,
                             gen_batch=4, warmup_steps=1, max_steps=1, out_dir=igpo_out, precision="bf16"))
    evaluation.main(readme_command("eval.py", "Dream", model=igpo_out, data=bench, gen_length=32, block_length=16,
                                   diffusion_steps=8, out_dir=tmp_path, precision="bf16"))
    assert capsys.readouterr().out.count("precision: weights bfloat16") == 3
    assert len(json.load(open(tmp_path / "eval_math500.json"))["generations"]) == len(SHORT_ROWS)
    assert json.load(open(os.path.join(igpo_out, "adapter_config.json")))["base_model_name_or_path"] == sft_out
    loaded = sft.load_model(igpo_out, trust_remote_code=True)[0]
    assert loaded.active_adapters == ["stage0", "stage1"]  # base + SFT adapter + IGPO adapter, unmerged


def test_full_fine_tuning_of_dream_saves_and_loads_back(tiny_dream, tmp_path):
    """Without --lora_r every weight trains; the checkpoint must save (Dream's own generation config cannot
    be validated by save_pretrained on transformers 4.57) and load back as a Dream."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SHORT_ROWS))
    out = tmp_path / "sft_full"
    sft.main(["--model", tiny_dream, "--trust_remote_code", "--dataset", str(data), "--gen_length", "16",
              "--batch_size", "2", "--max_steps", "1", "--out_dir", str(out), "--device", "cpu"])
    model, _, facts = sft.load_model(str(out), trust_remote_code=True)
    assert type(model).__name__ == "DreamModel" and facts.shifted


# ---------------------------------------------------------------- --kv_cache (NOTES.md §3 item 25)

def recorded_forwards(model, monkeypatch):
    """Every forward of model: (the token ids it is fed, how many positions its cache already holds). The fed
    tokens take the positions from there on (Dream's cache_position), so this is what the model sees where."""
    calls, real_forward = [], model.forward

    def recording_forward(x, **kw):
        cache = kw.get("past_key_values")
        calls.append((x.clone(), cache.get_seq_length() if cache is not None else 0))
        return real_forward(x, **kw)

    monkeypatch.setattr(model, "forward", recording_forward)
    return calls


def test_kv_cache_feeds_the_exact_canvas_at_its_positions(tiny_dream, monkeypatch):
    """A block's first forward is the whole canvas, as without the cache; each later step feeds the canvas from
    the block's start minus one (Dream's shift) on, at its own positions, and the prefix the cache holds plus
    what is fed is exactly the canvas the exact sampler feeds at that step (first block: nothing finished)."""
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    model.eval()
    x = torch.tensor(dream_prompts(tok, ["What is 2+3?", "What is 4+5?"]))
    P, L, Lb, steps = x.shape[1], 16, 8, 8
    runs = []
    for kv_cache in (False, True):
        calls = recorded_forwards(model, monkeypatch)
        sampler = evaluation.Sampler(L, Lb, steps, 0.0, False, 0, 0.0, kv_cache)
        runs.append((evaluation.generate(model, x, sampler, facts), calls))
        monkeypatch.undo()
    (_, exact), (_, cached) = runs
    assert [held for _, held in exact] == [0] * steps and len(cached) == steps
    per_block = steps // (L // Lb)
    for i, (fed, held) in enumerate(cached):
        start = P + (i // per_block) * Lb
        assert held == (0 if i % per_block == 0 else start - 1) and fed.shape[1] == P + L - held
    assert torch.equal(cached[0][0], exact[0][0])  # the first forward is the exact one
    assert torch.equal(torch.cat([cached[0][0][:, :P - 1], cached[1][0]], 1), exact[1][0])
    # one step per block: every forward is a block's first, so the cache changes no token
    one_step = evaluation.Sampler(L, Lb, L // Lb, 0.0, False, 0, 0.0, True)
    assert torch.equal(evaluation.generate(model, x, one_step, facts),
                       evaluation.generate(model, x, one_step._replace(kv_cache=False), facts))


def test_kv_cache_on_dream_with_hints_early_exit_and_threshold(tiny_dream, monkeypatch):
    """The cached sampler end to end: hints stay, nothing stays masked, a row whose end token is hinted leaves,
    rows leave a block's batch mid-block (the cache keeps the rows that stay), and each row's tokens are the ones
    it gets alone: the cache never mixes up rows."""
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 90, (3, 9), generator=g)  # three prompts of one length, different tokens
    L, Lb, steps, mask_id = 24, 8, 12, facts.mask_id
    hints = torch.full((3, L), mask_id)
    hints[0, 3] = facts.end_ids[0]  # row 0 ends in block 0 and leaves
    hints[1, 8:14] = torch.randint(0, 90, (6,), generator=g)  # row 1 has 2 masks in block 1: done after 2 steps
    hints[2, 17:19] = torch.randint(0, 90, (2,), generator=g)
    for tau in (0.0, 0.2):
        sampler = evaluation.Sampler(L, Lb, steps, 0.0, True, 0, tau, True)
        calls = recorded_forwards(model, monkeypatch)
        out = evaluation.generate(model, x, sampler, facts, hints)[:, -L:]
        monkeypatch.undo()
        keep = evaluation.completion_mask(out, torch.tensor(facts.end_ids))
        hinted = (hints != mask_id) & keep
        assert torch.equal(out[hinted], hints[hinted]) and not (out == mask_id).any()
        assert not keep[0, 4:].any()  # row 0 ended in block 0
        # a cached step ran fewer rows than the step before it: a row left mid-block, its keys and values too
        assert any(len(a) > len(b) and held for (a, _), (b, held) in zip(calls, calls[1:]))
        for r in range(3):
            alone = evaluation.generate(model, x[r:r + 1], sampler, facts, hints[r:r + 1])[:, -L:]
            assert torch.equal(alone[0], out[r]), (tau, r)


def test_no_forward_builds_a_cache_without_kv_cache(tiny_dream, monkeypatch):
    """Dream's config sets use_cache: true; loaded by sft.load_model, neither the sampler nor the estimator
    builds a cache unless --kv_cache asks."""
    from transformers.cache_utils import DynamicLayer
    model, tok, facts = sft.load_model(tiny_dream, trust_remote_code=True)
    model.eval()
    appended, real_update = [0], DynamicLayer.update

    def counting_update(self, *a, **kw):
        appended[0] += 1
        return real_update(self, *a, **kw)

    monkeypatch.setattr(DynamicLayer, "update", counting_update)
    prompts = dream_prompts(tok)[:1]
    with torch.no_grad():
        out = evaluation.generate(model, torch.tensor(prompts), evaluation.Sampler(8, 8, 4, 1.0), facts)
        igpo.token_logps(model, prompts, out[:, -8:], facts)
    assert appended[0] == 0
    evaluation.generate(model, torch.tensor(prompts), evaluation.Sampler(8, 8, 4, 1.0, kv_cache=True), facts)
    assert appended[0] > 0  # the counter sees a cache when one is built
