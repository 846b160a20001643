"""sft.py: the embedded world (tokenizer, model, task), the Eq. (2) loss, data loading and bad input."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tokenizer_round_trip_and_save(tokenizer, tmp_path):
    text = "Ann has 23 coins. Each day Ann gets 2 more.\n23+2=25\n\\boxed{25}"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:6] == ["Ann", " has", " ", "23", " coins", "."]  # words carry their space, as in BPE
    assert pieces.count("23") == 2  # a number is one token, the same in the question and in the trace
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.mask_token_id != tokenizer.pad_token_id
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(text, add_special_tokens=False).input_ids == ids
    assert back.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False) \
        == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
           "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_model_is_bidirectional_after_reload(tokenizer, tmp_path):
    sft.build_toy_model(tokenizer, hidden=32, layers=2, heads=2).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _, _ = sft.load_model(str(tmp_path))  # plain Auto classes under the hood
    model.eval()
    x = torch.tensor([tokenizer("12+5=17", add_special_tokens=False).input_ids])
    y = x.clone()
    y[0, -1] = tokenizer.convert_tokens_to_ids("9")
    with torch.no_grad():
        assert not torch.allclose(model(x).logits[0, 0], model(y).logits[0, 0])  # the future is visible


def test_encode_response_pads_to_gen_length(tokenizer, facts):
    eot, eos = tokenizer.convert_tokens_to_ids(sft.EOT), tokenizer.eos_token_id
    assert facts.end_ids == (eot, eos)  # (end of turn, padding)
    resp = sft.encode_response(tokenizer, "1+2=3", 12, facts.end_ids)
    assert len(resp) == 12
    assert resp[:6] == tokenizer("1+2=3", add_special_tokens=False).input_ids + [eot]
    assert resp[6:] == [eos] * 6
    assert sft.encode_response(tokenizer, "1+2=3", 6, facts.end_ids) is not None  # exactly fits: 5 + end of turn
    assert sft.encode_response(tokenizer, "1+2=3", 5, facts.end_ids) is None


def test_toy_splits_disjoint_and_traces_correct():
    train, test = sft.toy_dataset("train", 3000), sft.toy_dataset("test", 300)
    assert not set(train["question"]) & set(test["question"])
    for row in list(train)[:500]:
        x = None
        for line in row["trace"].split("\n")[:-1]:  # every step's arithmetic is right and chained
            lhs, rhs = line.split("=")
            a, op, b = __import__("re").match(r"(\d+)([-+*])(\d+)", lhs).groups()
            assert x is None or int(a) == x
            x = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert x == int(rhs)
        assert row["trace"].endswith(f"\\boxed{{{row['answer']}}}") and int(row["answer"]) == x
        assert len(row["verbose"]) > 2 * len(row["trace"])
        assert len(row["trace"].split("\n")) == row["days"] + 1  # one line per day, then the answer


def test_toy_difficulty_knob_and_every_trace_fits(tokenizer, facts):
    """The difficulty is the number of days (trace lines); every concise trace fits the default L = 48 with its
    end-of-turn token, so the length filter drops nothing; every word of the task is in the vocabulary."""
    rows = sft.toy_dataset("train", 2000)
    assert {r["days"] for r in rows} == set(range(1, sft.TOY_MAX_DAYS + 1))
    assert {r["days"] for r in sft.toy_dataset("train", 300, max_days=2)} == {1, 2}
    L = sft.get_args([]).gen_length
    for r in rows:
        assert sft.encode_response(tokenizer, r["trace"], L, facts.end_ids) is not None
        ids = tokenizer(sft.make_prompt(tokenizer, r["question"], True) + r["verbose"], add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids


class UniformModel(torch.nn.Module):
    """Uniform predictions: every masked token costs exactly log V, so the loss has a closed form."""
    def __init__(self, V):
        super().__init__()
        self.V, self.seen = V, []

    def forward(self, x):
        self.seen.append(x.clone())
        return type("Out", (), {"logits": torch.zeros(*x.shape, self.V, requires_grad=True)})


def test_sft_loss_matches_hand_computation():
    B, P, L, V, mask_id = 3, 4, 6, 11, 10
    ids = torch.randint(0, 10, (B, P + L))
    rows = [(r[:P].tolist(), r[P:].tolist()) for r in ids]
    facts = sft.Facts(mask_id=mask_id, end_ids=(1, 2), shifted=False, lora_targets=(), n_tokens=V)
    model = UniformModel(V)
    loss = sft.sft_loss(model, rows, facts, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the same draws by hand
    t = torch.rand(B, 1, generator=g)
    u = torch.rand(B, L, generator=g)
    expected = 0.0
    for b in range(B):
        p = (1 - 1e-3) * t[b, 0].item() + 1e-3
        n_masked = sum(1 for i in range(L) if u[b, i].item() < p)
        expected += n_masked * math.log(V) / (p * L)
    assert loss.item() == pytest.approx(expected / B, rel=1e-5)
    noisy = model.seen[0]
    assert torch.equal(noisy[:, :P], ids[:, :P])  # the prompt is never masked
    assert torch.equal(noisy[:, P:] == mask_id, u < (1 - 1e-3) * t + 1e-3)  # each response token w.p. p


def test_prompt_never_masked_over_many_draws(tokenizer, facts):
    model = UniformModel(len(tokenizer))
    ids = torch.randint(10, 90, (8, 30))
    rows = [(r[:20].tolist(), r[20:].tolist()) for r in ids]
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        sft.sft_loss(model, rows, facts, g)
    seen = torch.stack(model.seen)
    assert not (seen[:, :, :20] == tokenizer.mask_token_id).any()
    assert (seen[:, :, 20:] == tokenizer.mask_token_id).any()


def args_for(tmp_path, *extra):
    """The arguments, and the run's folder made as sft.open_run makes it before the data is built."""
    os.makedirs(tmp_path / "run", exist_ok=True)
    return sft.get_args(["--out_dir", str(tmp_path / "run"), "--toy_size", "64", *extra])


def test_local_jsonl_with_renamed_columns_and_length_filter(tokenizer, facts, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    rows = [{"query": "What is 2+3?", "response": "2+3=5. The answer is: 5"},
            {"query": "Long one?", "response": "1+1=2\n" * 10}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    args = args_for(tmp_path, "--dataset", str(path), "--question_col", "query", "--trace_col", "response",
                    "--gen_length", "32")
    data = sft.build_sft_data(args, tokenizer, facts, "cpu", same_answer=None)
    assert len(data) == 1 and "1 longer ones dropped" in capsys.readouterr().out
    prompt, resp = data[0]
    text = sft.make_prompt(tokenizer, "What is 2+3?", toy=False)  # real data gets the reasoning-format prompt
    assert sft.REASONING_PROMPT in text and prompt == tokenizer(text, add_special_tokens=False).input_ids
    assert len(resp) == 32


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "missing.jsonl"], "could not read missing.jsonl as JSON/JSONL: FileNotFoundError"),
    (["--dataset", "{tmp}/bad.jsonl", "--trace_col", "solution"], "has no column 'solution'"),
    (["--gen_length", "8"], "no trace fits --gen_length 8"),
    # the embedded model is built at random: an adapter over it would name no base it could be loaded onto
    (["--lora_r", "4"], "--lora_r needs a saved base model"),
])
def test_bad_input_one_line_error(tmp_path, flags, message):
    # In process: sft.fail raises SystemExit with one line, which Python prints to stderr with exit code 1.
    import eval as evaluation
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "trace": "t"}) + "\n")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as e:  # eval.py's measures handed in, as `python sft.py` does
        sft.main(["--out_dir", str(tmp_path / "o"), "--toy_size", "32", *flags],
                 regime_check=evaluation.regime_check, same_answer=evaluation.same_answer)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert message in e.value.code and len(e.value.code.splitlines()) == 1, e.value.code
    assert not (tmp_path / "o" / "model.safetensors").exists()  # nothing half-written


def test_full_fine_tuning_from_a_lora_checkpoint_trains_every_weight(tmp_path):
    """sft.py --model <a LoRA checkpoint> without --lora_r folds the adapter in and trains all weights of the
    merged model (PEFT leaves the base weights frozen after merging)."""
    small = ["--toy_size", "64", "--batch_size", "4", "--max_steps", "1", "--log_every", "1"]
    sft.main(small + ["--out_dir", str(tmp_path / "base")])
    sft.main(small + ["--model", str(tmp_path / "base"), "--lora_r", "4", "--out_dir", str(tmp_path / "lora")])
    sft.main(small + ["--model", str(tmp_path / "lora"), "--out_dir", str(tmp_path / "full")])
    merged = sft.load_model(str(tmp_path / "lora"), merge=True)[0].state_dict()
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert merged.keys() >= full.keys() and len(full) > 10
    assert all(not torch.equal(full[k], merged[k]) for k in full if k.endswith("Wqkv.weight"))


def test_end_to_end_tiny_run_loads_back(tmp_path):
    sft.main(["--out_dir", str(tmp_path / "run"), "--toy_size", "64", "--max_steps", "3", "--batch_size", "4",
              "--save_every", "2", "--log_every", "1"])
    run = tmp_path / "run"
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(run)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.load(open(run / "args.json"))["max_steps"] == 3
    lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3] and all(math.isfinite(l["loss"]) for l in lines)
    with pytest.raises(SystemExit, match="already holds a run"):  # never clobber a finished run by accident
        sft.main(["--out_dir", str(run), "--toy_size", "64", "--max_steps", "3"])


def test_prompt_format(tokenizer):
    """NOTES.md §3 item 23: one user turn of the chat template with the generation prompt; real data puts the
    format instruction (which asks for a box) before the question, the embedded task uses the bare question."""
    turn = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>" \
           "<|start_header_id|>assistant<|end_header_id|>\n\n"
    instruction = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n" \
                  "Put the final answer in \\boxed{}.\n\n"
    assert sft.make_prompt(tokenizer, "What is 2+2?", False) == turn.format(instruction + "What is 2+2?")
    assert sft.make_prompt(tokenizer, "Ann has 3 pens.", True) == turn.format("Ann has 3 pens.")


def test_sft_stops_at_the_first_check_at_or_below_the_threshold(tmp_path, monkeypatch):
    """The stop rule itself (NOTES.md §3 item 20), with the regime check stubbed and checked every 2 steps:
    no check before STOP_FROM, each check logged, and the run saved and ended at the first check whose
    all-wrong fraction is at most --stop_all_wrong (equal to it included)."""
    checks = iter([0.9, 0.36, 0.35, 0.1, 0.1])
    monkeypatch.setattr(sft, "STOP_FROM", 4)
    monkeypatch.setattr(sft, "STOP_EVERY", 2)
    run = tmp_path / "run"
    sft.main(["--out_dir", str(run), "--toy_size", "64", "--max_steps", "20", "--batch_size", "4",
              "--log_every", "100", "--save_every", "100"], regime_check=lambda *args: next(checks))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    logged = [(row["step"], row["all_wrong"]) for row in rows if "all_wrong" in row]
    assert logged == [(4, 0.9), (6, 0.36), (8, 0.35)]
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 8  # the checkpoint is the stopped policy


@pytest.mark.slow
def test_default_sft_stops_in_the_regime_igpo_is_for(tmp_path):
    """The embedded default SFT (seed 0, torch's default thread count) stops once about a third of held-out
    problems are all wrong at the rollout temperature (NOTES.md §3 item 20), and hands RL a policy in that
    regime: on RL's own prompts (a stream neither SFT nor the check used), 20-45% of groups of G = 8 samples at
    T = 1.2 are all wrong (measured with 1 and 2 threads: NOTES.md §10.2; the band asserted here is widened by
    the noise of 128 prompts). The thread count moves the step at which the rule fires, not where it lands."""
    import eval as evaluation
    sft.main(["--out_dir", str(tmp_path / "run")], regime_check=evaluation.regime_check)
    model, tok, facts = sft.load_model(str(tmp_path / "run"))
    ds = sft.toy_dataset("train", 128, seed="rl-0")  # the default RL run's first prompts
    items = list(zip(ds["question"], ds["answer"]))
    records, _ = evaluation.evaluate(model, tok, facts, items, "toy", evaluation.Sampler(48, 8, 24, 1.2), 8,
                                     torch.Generator().manual_seed(0))
    checks = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if "all_wrong" in l]
    assert checks[-1]["all_wrong"] <= 0.35 and all(c["all_wrong"] > 0.35 for c in checks[:-1])  # the first
    assert checks[-1]["step"] < 3000  # stopped by the rule, not by the schedule's end
    all_wrong = sum(r["correct"] == 0 for r in records) / len(records)
    print(f"stopped at step {checks[-1]['step']}, all-wrong on 128 RL prompts {all_wrong:.3f}")
    assert 0.15 <= all_wrong <= 0.5


# ---------------------------------------------------------------------------------------------------------
# The rewriting step (--rewrite_model): a stub rewriter with known outputs, then a real causal LM.

# (question, original trace, what the stub rewriter writes for it, verdict)
REWRITES = [  # with L = 32: a rewrite fits when its tokens and the end of turn are at most 32
    ("q0", "a long way round ... \\boxed{5}", "2+3=5\n" * 4 + "5\n\\boxed{5}", "kept"),  # 31 tokens: fits exactly
    ("q1", "... so the answer is \\boxed{7}", "\\boxed{8}", "wrong"),  # another final answer
    ("q2", "... \\boxed{9}", "1+1=2\n" * 4 + "9.\n\\boxed{9}", "long"),  # right answer, 32 tokens: one too many
    ("q3", "2+2=4. The answer is: 4", "2+2=4\n\\boxed{4}", "kept"),  # MetaMathQA's ending, read as igpo reads it
    ("q4", "no final answer here", "\\boxed{1}", "wrong"),  # the original has none to match
    ("q5", "... \\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{8}}", "kept"),  # equal as real data's reward grades
]


def rewrite_data(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"question": q, "trace": t}) + "\n" for q, t, _, _ in REWRITES))
    return path


def stub_rewriter(monkeypatch, asked, fail_after=None):
    """sft.load_rewriter replaced by a rewriter whose outputs are REWRITES'; `asked` records every batch it gets,
    and the call after `fail_after` batches dies as a killed run would."""
    outputs = {(q, t): r for q, t, r, _ in REWRITES}

    def load(name, device, max_new_tokens):
        assert max_new_tokens == 2 * 32  # twice L, in the rewriter's own tokens

        def rewrite(pairs):
            if len(asked) == fail_after:
                raise KeyboardInterrupt
            asked.append(list(pairs))
            return [outputs[p] for p in pairs]
        return rewrite
    monkeypatch.setattr(sft, "load_rewriter", load)


def test_rewrite_keeps_the_same_answer_that_fits_and_counts(tokenizer, facts, tmp_path, monkeypatch, capsys):
    import eval as evaluation
    asked = []
    stub_rewriter(monkeypatch, asked)
    args = args_for(tmp_path, "--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm",
                    "--gen_length", "32", "--rewrite_batch", "4")
    rows = sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    assert [len(b) for b in asked] == [4, 2]  # every trace once, in batches of --rewrite_batch
    kept = [r for _, _, r, verdict in REWRITES if verdict == "kept"]
    assert [resp for _, resp in rows] == [sft.encode_response(tokenizer, r, 32, facts.end_ids) for r in kept]
    questions = [q for q, _, _, verdict in REWRITES if verdict == "kept"]
    assert [p for p, _ in rows] == [tokenizer(sft.make_prompt(tokenizer, q, False), add_special_tokens=False)
                                    .input_ids for q in questions]
    out = capsys.readouterr().out
    assert "rewrite: 6 traces rewritten (0 from the cache), 3 kept, 2 with a wrong answer, " \
           "1 too long for gen_length=32\n" in out
    cache = [json.loads(line) for line in open(tmp_path / "run" / "rewrites.jsonl")]
    assert cache == [{"model": "stub/lm", "question": q, "trace": t, "rewrite": r} for q, t, r, _ in REWRITES]


def test_another_rewriters_cache_lines_are_redone(tokenizer, facts, tmp_path, monkeypatch, capsys):
    """The cache is per rewriter: lines another --rewrite_model wrote in this folder are not reused."""
    import eval as evaluation
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "rewrites.jsonl").write_text("".join(
        json.dumps({"model": "other/lm", "question": q, "trace": t, "rewrite": "\\boxed{0}"}) + "\n"
        for q, t, _, _ in REWRITES))
    asked = []
    stub_rewriter(monkeypatch, asked)
    args = args_for(tmp_path, "--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm",
                    "--gen_length", "32")
    rows = sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    assert len(rows) == 3 and sum(len(b) for b in asked) == 6
    assert "rewrite: 6 traces rewritten (0 from the cache), 3 kept," in capsys.readouterr().out


def test_rewrite_resumes_from_its_cache_after_a_kill(tokenizer, facts, tmp_path, monkeypatch, capsys):
    import eval as evaluation
    args = args_for(tmp_path, "--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm",
                    "--gen_length", "32", "--rewrite_batch", "2")
    stub_rewriter(monkeypatch, [], fail_after=1)
    with pytest.raises(KeyboardInterrupt):  # killed while the second batch was being rewritten
        sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    cache = tmp_path / "run" / "rewrites.jsonl"
    assert [json.loads(line)["question"] for line in open(cache)] == ["q0", "q1"]
    with open(cache, "a") as f:  # and a line cut short by the kill
        f.write('{"question": "q2", "tra')
    asked = []
    stub_rewriter(monkeypatch, asked)
    rows = sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    assert [q for batch in asked for q, _ in batch] == ["q2", "q3", "q4", "q5"]  # only what was not cached
    assert "rewrite: 6 traces rewritten (2 from the cache), 3 kept," in capsys.readouterr().out
    assert [json.loads(line)["question"] for line in open(cache)] == [f"q{i}" for i in range(6)]
    assert len(rows) == 3
    asked.clear()
    sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    assert asked == []  # everything cached: the rewriter is not even loaded


def test_sft_trains_on_the_kept_rewrites_and_keeps_the_cache(tmp_path, monkeypatch, capsys):
    """sft.main: the rewriting step, then SFT on the same path; the cache survives the checkpoint's swap."""
    import eval as evaluation
    stub_rewriter(monkeypatch, [])
    run = tmp_path / "run"
    sft.main(["--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm", "--gen_length", "32",
              "--batch_size", "2", "--max_steps", "2", "--out_dir", str(run)], same_answer=evaluation.same_answer)
    assert "data: 3 traces fit gen_length=32, 0 longer ones dropped" in capsys.readouterr().out
    assert len(open(run / "rewrites.jsonl").readlines()) == 6 and (run / "model.safetensors").exists()


def test_rewrite_first_then_train_from_the_cache(tmp_path, monkeypatch, capsys):
    """The README's order under torchrun: --max_steps 0 rewrites and caches the traces and says that it saved
    no model; the training run in the same folder then reads the cache and loads no rewriter."""
    import eval as evaluation
    asked = []
    stub_rewriter(monkeypatch, asked)
    run = tmp_path / "run"
    argv = ["--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm", "--gen_length", "32",
            "--batch_size", "2", "--out_dir", str(run)]
    sft.main(argv + ["--max_steps", "0"], same_answer=evaluation.same_answer)
    assert capsys.readouterr().out.endswith("no step taken: no checkpoint saved\n")
    assert os.listdir(run) == ["rewrites.jsonl"] and len(asked) == 1
    sft.main(argv + ["--max_steps", "1"], same_answer=evaluation.same_answer)
    assert len(asked) == 1 and "(6 from the cache), 3 kept" in capsys.readouterr().out
    assert (run / "model.safetensors").exists()


def test_rewriting_without_the_answer_grader_fails_before_it_rewrites(tmp_path, monkeypatch):
    """sft.main called without eval.same_answer: one line at once, not a TypeError after the rewriting pass."""
    asked = []
    stub_rewriter(monkeypatch, asked)
    with pytest.raises(SystemExit, match="^error: the rewriting step needs eval.same_answer"):
        sft.main(["--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm", "--gen_length", "32",
                  "--out_dir", str(tmp_path / "run")])
    assert asked == [] and not (tmp_path / "run" / "rewrites.jsonl").exists()


def test_rewrite_that_keeps_nothing_says_why(tokenizer, facts, tmp_path, monkeypatch):
    import eval as evaluation
    monkeypatch.setattr(sft, "load_rewriter", lambda *a: lambda pairs: ["\\boxed{0}"] * len(pairs))
    args = args_for(tmp_path, "--dataset", str(rewrite_data(tmp_path)), "--rewrite_model", "stub/lm",
                    "--gen_length", "32")
    with pytest.raises(SystemExit) as e:
        sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    assert e.value.code == "error: --rewrite_model kept no trace: 6 traces rewritten (0 from the cache), 0 kept, " \
                          "6 with a wrong answer, 0 too long for gen_length=32"


def build_tiny_causal_lm(path, tokenizer):
    """A tiny random Llama causal LM in a save_pretrained folder, with the embedded tokenizer (which has a chat
    template), standing in for a local instruct model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_rewrite_with_a_real_causal_lm(tokenizer, facts, tmp_path):
    """The real generate path: greedy, batched with left padding, the same text as one trace at a time; then
    the filter (a random LM keeps nothing: one line that says why) and the cache (read back, no generation)."""
    import eval as evaluation
    lm = build_tiny_causal_lm(tmp_path / "lm", tokenizer)
    pairs = [("Ann has 3 coins.", "3+2=5\n\\boxed{5}"), ("Ben has 10 pens. Each day Ben gets 2 more.", "\\boxed{1}")]
    rewrite = sft.load_rewriter(lm, "cpu", 12)
    batched = rewrite(pairs)
    assert batched == [rewrite([p])[0] for p in pairs] and all(isinstance(t, str) for t in batched)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": q, "trace": t}) + "\n" for q, t in pairs))
    args = args_for(tmp_path, "--dataset", str(data), "--rewrite_model", lm, "--gen_length", "16")
    for _ in range(2):  # the second time every rewrite comes from the cache
        with pytest.raises(SystemExit, match="kept no trace: 2 traces rewritten"):
            sft.build_sft_data(args, tokenizer, facts, "cpu", evaluation.same_answer)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "rewrites.jsonl")]
    assert [(r["question"], r["trace"]) for r in lines] == pairs
    assert [r["rewrite"] for r in lines] == sft.load_rewriter(lm, "cpu", 32)(pairs)  # 2 L new tokens


def test_rewriter_decodes_plain_greedy_whatever_its_generation_config(tokenizer, tmp_path):
    """An instruct model's generation_config.json may sample, or penalise repeats (which would penalise
    copying the original's numbers); the rewriter ignores all of it but the end tokens: the same rewrites as
    the same weights with a plain config, and the same as greedy decoding by hand."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    plain = build_tiny_causal_lm(tmp_path / "plain", tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(plain)
    lm.generation_config = GenerationConfig(do_sample=True, temperature=3.0, repetition_penalty=3.0,
                                            no_repeat_ngram_size=1, eos_token_id=tokenizer.eos_token_id)
    lm.save_pretrained(tmp_path / "fancy")
    tokenizer.save_pretrained(tmp_path / "fancy")
    pairs = [("Ann has 3 coins.", "3+2=5\n\\boxed{5}")]
    torch.manual_seed(0)
    fancy = sft.load_rewriter(str(tmp_path / "fancy"), "cpu", 12)(pairs)
    assert fancy == sft.load_rewriter(plain, "cpu", 12)(pairs)
    chat = [{"role": "user", "content": sft.REWRITE_PROMPT % pairs[0]}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    for _ in range(12):  # greedy by hand: the argmax, until the end token
        nxt = lm(ids).logits[0, -1].argmax()
        if nxt == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    n_prompt = len(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    assert fancy == [tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()]


@pytest.mark.parametrize("flags,message", [
    (["--rewrite_model", "x/y"], "--rewrite_model needs real data (--dataset)"),
    (["--dataset", "{tmp}/d.jsonl", "--rewrite_model", "{tmp}/none"],
     "could not load --rewrite_model '{tmp}/none'"),
    (["--dataset", "{tmp}/d.jsonl", "--rewrite_model", "{tmp}/plain"], "has no chat template"),
])
def test_rewrite_bad_input_one_line_error(tmp_path, tokenizer, flags, message):
    import eval as evaluation
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "trace": "\\boxed{1}"}) + "\n")
    plain = build_tiny_causal_lm(tmp_path / "plain", tokenizer)
    config = json.load(open(os.path.join(plain, "tokenizer_config.json")))
    config.pop("chat_template", None)
    json.dump(config, open(os.path.join(plain, "tokenizer_config.json"), "w"))
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(plain, name)):
            os.remove(os.path.join(plain, name))
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as e:
        sft.main(["--out_dir", str(tmp_path / "o"), "--gen_length", "16", *flags], same_answer=evaluation.same_answer)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert message.replace("{tmp}", str(tmp_path)) in e.value.code and "\n" not in e.value.code, e.value.code


def test_the_stop_rules_measure_is_handed_in(tmp_path):
    """sft.py never imports eval.py: a run that would reach the stop rule's first check without its measure
    says so at the start, in one line, before anything is written."""
    with pytest.raises(SystemExit) as e:
        sft.main(["--out_dir", str(tmp_path / "o"), "--max_steps", str(sft.STOP_FROM)])
    assert e.value.code.startswith("error: the stop rule needs eval.regime_check")
    assert not (tmp_path / "o").exists()  # refused before anything is written
