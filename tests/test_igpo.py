"""igpo.py: advantages, inpainting and replacement, the estimator, the entropy filter, the loss, and a short
end-to-end run."""
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

import igpo
import sft
from conftest import tiny_model


def make_args(**kw):
    args = igpo.get_args(["--limit", "0"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_all_wrong_group_has_zero_advantage():
    reward = torch.tensor([[0.0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    adv = igpo.advantages(reward).view(3, 4)  # Eq. (3), the function main() calls
    assert torch.equal(adv[0], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))
    assert adv[1].tolist() == [0.5, -0.5, 0.5, -0.5]
    # and such groups contribute no policy gradient: the surrogate is 0 whatever the log-probs
    logp = torch.randn(4, 5, requires_grad=True)
    loss, _, _ = igpo.grpo_loss(logp, logp.detach(), logp.detach(), adv[0], torch.ones(4, 5, dtype=torch.bool), 0.2, 0.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 5))


def test_make_hints_chunks_eta_and_positions(tokenizer):
    trace = tokenizer("12+30=42\n42-5=37\n37*2=74\n", add_special_tokens=False).input_ids
    mask_id, L = tokenizer.mask_token_id, 32
    g = torch.Generator().manual_seed(0)
    for eta in [0.0, 0.3, 0.5, 1.0]:
        for _ in range(20):
            h = igpo.make_hints(trace, L, eta, 3, 6, mask_id, g)
            shown = (h != mask_id).nonzero().flatten().tolist()
            assert all(h[i] == trace[i] for i in shown)  # each revealed token sits at its own position
            if eta == 0:
                assert shown == []
            if eta == 1:
                assert shown == list(range(len(trace)))
            # revealed positions form runs of whole chunks: about eta of the trace
            assert abs(len(shown) - eta * len(trace)) <= 6 + 0.5 * 6


def hint_args(**kw):
    """The flags hint_canvases reads, the paper's eta range by default."""
    return types.SimpleNamespace(**{"gen_length": 64, "num_generations": 8, "eta_low": 0.2, "eta_high": 0.6,
                                    "chunk_min": 1, "chunk_max": 1, **kw})


def test_eta_is_drawn_uniformly_for_each_canvas(tokenizer):
    """Eq. (7): every inpainted canvas draws its own eta ~ U[eta_low, eta_high]. With one-token chunks a canvas
    reveals exactly round(eta n) of its trace's n tokens, so the revealed fractions of 400 canvases show the
    distribution of eta: its range, both ends of it reached, its mean (eta_low + eta_high) / 2 and spread
    (eta_high - eta_low) / sqrt(12), a quarter of the canvases in each quarter of the range; and the G canvases
    of one trace differ from each other (eta per canvas, not per trace or per group)."""
    mask_id, args = tokenizer.mask_token_id, hint_args()
    trace = "".join(f"{a}+1={a + 1}\n" for a in range(10, 17))
    n = len(igpo.hintable_trace_ids(tokenizer, trace, args.gen_length))
    assert n == 42
    hints = igpo.hint_canvases(tokenizer, [trace] * 50, args, mask_id, torch.Generator().manual_seed(0))
    frac = (hints != mask_id).sum(1).double() / n  # (400,)
    lo, hi, half_token = 0.2, 0.6, 0.5 / n
    assert frac.min() >= lo - half_token and frac.max() <= hi + half_token  # inside the range ...
    assert frac.min() < lo + 0.03 and frac.max() > hi - 0.03  # ... and both of its ends reached
    assert frac.mean().item() == pytest.approx((lo + hi) / 2, abs=0.02)  # 3 standard errors
    assert frac.std().item() == pytest.approx((hi - lo) / math.sqrt(12), abs=0.015)
    quarters = torch.histc(frac.clamp(lo, hi), bins=4, min=lo, max=hi)  # 100 expected in each, sd ~8.7
    assert ((quarters > 70) & (quarters < 130)).all(), quarters
    per_trace = frac.view(50, args.num_generations)
    assert (per_trace.max(1).values > per_trace.min(1).values).all()  # one trace, G different etas
    # the sample-matched control: eta_low = eta_high = 0 reveals nothing
    none = igpo.hint_canvases(tokenizer, [trace] * 2, hint_args(eta_low=0.0, eta_high=0.0), mask_id,
                              torch.Generator().manual_seed(0))
    assert (none == mask_id).all()


def round_half_even(x):
    """The nearest integer to x, the even one at a tie (what Python's round does), written out."""
    f = math.floor(x)
    return f + int(x - f > 0.5 or (x - f == 0.5 and f % 2 == 1))


@pytest.mark.parametrize("size", [1, 3])
def test_revealed_chunk_count_is_eta_times_chunks_rounded_half_to_even(size):
    """Eq. (7), NOTES.md §3 item 22: round(eta * #chunks) whole chunks are revealed, ties to the even count (a
    one-chunk trace at eta = 0.5 gets none, three chunks at eta = 0.5 get two). Every eta on a grid that holds
    each tie j / (2n), for n = 1..12 chunks; chunks of one fixed size cut the trace at size, 2 size, ..., so the
    revealed positions must be whole chunks and their number is the count (with size 3, a count of tokens
    instead of chunks shows)."""
    mask_id, g = 99, torch.Generator().manual_seed(0)
    for n in range(1, 13):
        trace_ids = list(range(10, 10 + size * n))
        etas = sorted({j / (2 * n) for j in range(2 * n + 1)} | {k / 40 for k in range(41)})
        for eta in etas:
            h = igpo.make_hints(trace_ids, size * n, eta, size, size, mask_id, g)
            shown = (h != mask_id).view(n, size)
            assert (shown.all(1) | ~shown.any(1)).all()  # whole chunks only
            assert torch.equal(h[h != mask_id], torch.tensor(trace_ids)[h != mask_id])  # at their own positions
            assert int(shown.all(1).sum()) == round_half_even(eta * n), (n, eta)


def test_hints_never_contain_the_answer(tokenizer):
    trace = "12+30=42\n42-5=37\n\\boxed{37}"
    ids = igpo.hintable_trace_ids(tokenizer, trace, 64)
    assert tokenizer.decode(ids) == "12+30=42\n42-5=37\n"
    metamath = "Ann gets 4 more, so 3+4=7.\nThe answer is: 7"
    assert tokenizer.decode(igpo.hintable_trace_ids(tokenizer, metamath, 64)) == "Ann gets 4 more, so 3+4=7.\n"
    assert igpo.answer_from_trace(metamath) == "7" and igpo.answer_from_trace(trace) == "37"
    # the cut is at the FIRST marker of any kind: GSM_AnsAug states its answer twice, the reasoning format puts
    # it in <answer> tags (the toy tokenizer reads '<' as <|unk|>: ids are compared, not text)
    ids_of = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    for head, tail in [("So 3+4=7.\n", "#### 7\nThe answer is: 7"), ("3+4=7\n", "<answer>\n7\n</answer>"),
                       ("3+4=7 is ", "\\boxed{7}.\nThe answer is: 7")]:
        assert igpo.hintable_trace_ids(tokenizer, head + tail, 64) == ids_of(head)


def fake_batch(answers, B):
    return [(f"Q{b}?", f"{10 + b}+{b}={10 + 2 * b}\n\\boxed{{{answers[b]}}}", str(answers[b])) for b in range(B)]


@pytest.mark.parametrize("n_correct,expected_K", [(0, 0), (1, 1), (3, 3), (4, 4), (8, 4)])
def test_replacement_rule_and_own_trace(tokenizer, n_correct, expected_K):
    """Only all-wrong groups are inpainted, each from its own trace, and K = min(#correct, floor(lambda G));
    the inputs are left as they were (the step gets new tensors back)."""
    B, G, L = 3, 8, 24
    mask_id = tokenizer.mask_token_id
    args = make_args(num_generations=G, gen_length=L, block_length=8, diffusion_steps=8, max_replace_frac=0.5,
                     eta_low=0.5, eta_high=0.5, chunk_min=2, chunk_max=3)
    batch = fake_batch([11, 13, 15], B)
    groups = [0, 2]  # group 1 is not all-wrong and must be left alone
    hints = igpo.hint_canvases(tokenizer, [batch[b][1] for b in groups], args, mask_id, torch.Generator().manual_seed(0))
    assert hints.shape == (2 * G, L)
    for g, b in enumerate(groups):  # group b's canvases hold only tokens of b's own trace, never its answer
        own = igpo.hintable_trace_ids(tokenizer, batch[b][1], L)
        for row in hints[g * G:(g + 1) * G]:
            for i in (row != mask_id).nonzero().flatten().tolist():
                assert row[i] == own[i]
    inpainted = torch.where(hints == mask_id, tokenizer.eos_token_id, hints)  # what a rollout keeps: the hints
    correct = (torch.arange(G) < n_correct).repeat(2, 1)  # the first n_correct inpainted samples of each group
    completions = torch.full((B * G, L), tokenizer.eos_token_id)
    reward = torch.zeros(B, G)
    reward[1, 0] = 1.0
    before = (completions.clone(), reward.clone())
    completions2, reward2, hint_mask, Ks = igpo.replace_wrong(completions, reward, groups, inpainted, correct,
                                                             hints, 0.5, mask_id)
    assert Ks == [expected_K] * 2
    assert torch.equal(completions, before[0]) and torch.equal(reward, before[1])
    for g, b in enumerate(groups):
        assert reward2[b].sum() == expected_K
        assert torch.equal(completions2[b * G:b * G + expected_K], inpainted[g * G:g * G + expected_K])
        assert hint_mask[b * G:b * G + expected_K].any(1).all() and not hint_mask[b * G + expected_K:(b + 1) * G].any()
    assert torch.equal(completions2[G:2 * G], before[0][G:2 * G]) and reward2[1].tolist() == [1] + [0] * 7
    adv = igpo.advantages(reward2).view(reward2.shape)
    assert (adv[0].abs().sum() > 0) == (expected_K > 0)  # a rescued group now has a learning signal


@pytest.mark.parametrize("lam,n_correct", [(0.5, 5), (0.5, 2), (0.45, 8), (0.3, 8), (0.1, 8)])
def test_replacement_marks_exactly_the_injected_hints(lam, n_correct):
    """Eq. (8) on groups whose right inpainted samples are scattered (not the first ones): in each all-wrong
    group, K = min(#right, floor(lambda G)) rows are replaced (0.45 * 8 = 3.6 -> 3, 0.1 * 8 -> 0), each by a
    right inpainted sample of the group's own canvases, used once; a row's reward is 1 exactly where it was
    replaced; hint_mask marks, in a replaced row, exactly the positions where its sample's canvas held a hint,
    and nothing in any other row. Every row of every tensor is distinct, so each replaced row names its source."""
    G, L, mask_id, B = 8, 12, 99, 3
    g = torch.Generator().manual_seed(int(lam * 100) + n_correct)
    groups = [2, 0]  # not in batch order: inpainted group g belongs to batch group groups[g]
    completions = torch.randint(100, 200, (B * G, L), generator=g)  # the wrong originals
    hints = torch.where(torch.rand(2 * G, L, generator=g) < 0.4, torch.randint(200, 300, (2 * G, L), generator=g),
                        mask_id)
    inpainted = torch.where(hints == mask_id, torch.randint(300, 400, (2 * G, L), generator=g), hints)
    correct = torch.zeros(2, G, dtype=torch.bool)
    for row in correct:
        row[torch.randperm(G, generator=g)[:n_correct]] = True
    assert correct[:, :n_correct].all(1).tolist() != [True, True] or n_correct == G  # scattered
    reward = torch.zeros(B, G)
    reward[1, [2, 5]] = 1.0  # group 1 has right samples: not inpainted, left alone
    new, new_reward, hint_mask, Ks = igpo.replace_wrong(completions, reward, groups, inpainted, correct, hints, lam,
                                                        mask_id)
    K = min(n_correct, math.floor(lam * G))
    assert Ks == [K, K]
    for b in range(B):
        sources = []
        for r in range(b * G, (b + 1) * G):
            if torch.equal(new[r], completions[r]):  # kept
                assert new_reward[b, r - b * G] == reward[b, r - b * G] and not hint_mask[r].any()
                continue
            src = [j for j in range(2 * G) if torch.equal(new[r], inpainted[j])]
            assert len(src) == 1
            src = src[0]
            assert b in groups and src // G == groups.index(b) and correct[src // G, src % G]  # own group, right
            assert new_reward[b, r - b * G] == 1.0
            assert torch.equal(hint_mask[r], hints[src] != mask_id)  # exactly the injected hint tokens
            sources.append(src)
        assert len(sources) == len(set(sources)) == (K if b in groups else 0)
    assert new_reward.sum() == 2 + 2 * K


def test_estimator_equals_per_sample_hand_computation(tokenizer, facts):
    model = tiny_model(tokenizer)
    G, L, mask_id = 3, 10, tokenizer.mask_token_id
    # prompts 0 and 2 share a length and one forward pass: the results must come back in prompt order
    seqs = [tokenizer(sft.make_prompt(tokenizer, q, True), add_special_tokens=False).input_ids
            for q in ["Ann has 3 pens. How many?", "Jo has 41 eggs. Sells 9. How many eggs now?",
                      "Max has 5 eggs. How many?"]]
    assert len(seqs[0]) == len(seqs[2]) != len(seqs[1])
    completions = torch.randint(7, 100, (3 * G, L))
    with torch.no_grad():
        logp, entropy = igpo.token_logps(model, seqs, completions, facts, with_entropy=True)
        for b, s in enumerate(seqs):  # each sample alone, unpadded, the obvious way
            x = torch.tensor([s + [mask_id] * L])
            logprobs = F.log_softmax(model(x).logits[0, len(s):].double(), -1)  # (L, V)
            H = -(logprobs.exp() * logprobs).sum(-1)
            assert torch.allclose(entropy[b].double(), H, atol=1e-4)
            for i in range(G):
                o = completions[b * G + i]
                assert torch.allclose(logp[b * G + i].double(), logprobs[torch.arange(L), o], atol=1e-4)


def test_entropy_filter_keeps_top_tau_hints():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 1.0]])
    hint = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # 7 hints
    for tau, expected in [(0.2, [1]), (0.3, [1, 6]), (0.5, [1, 3, 6]), (1.0, [1, 2, 3, 5, 6, 7, 8]), (0.01, [1])]:
        keep = igpo.entropy_filter(entropy, hint, tau)
        assert keep.nonzero()[:, 1].tolist() == expected  # floor(tau * 7), at least one, highest entropy
    assert not igpo.entropy_filter(entropy, torch.zeros_like(hint), 0.2).any()  # no hints: nothing kept
    # per row: each row's own n and its own ranking (a second row with 10 hints and the entropies reversed)
    two = igpo.entropy_filter(torch.cat([entropy, entropy.flip(1)]), torch.cat([hint, torch.ones_like(hint)]), 0.3)
    assert two[0].nonzero().flatten().tolist() == [1, 6] and two[1].nonzero().flatten().tolist() == [0, 3, 8]


def test_surrogate_equals_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]])
    logp_old = torch.tensor([[-1.1, -1.5, -0.5], [-0.6, -1.0, -2.0]])
    logp_ref = torch.tensor([[-1.0, -1.8, -0.7], [-0.4, -1.2, -2.5]])
    adv = torch.tensor([0.5, -0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    eps, beta = 0.2, 0.1
    total = 0.0
    for i in range(2):
        terms = []
        for k in range(3):
            if not mask[i, k]:
                continue
            r = math.exp(logp[i, k] - logp_old[i, k])
            a = adv[i].item()
            surr = min(r * a, max(min(r, 1 + eps), 1 - eps) * a)
            d = (logp_ref[i, k] - logp[i, k]).item()
            terms.append(-surr + beta * (math.exp(d) - d - 1))
        total += sum(terms) / len(terms)
    loss, kl, clip = igpo.grpo_loss(logp, logp_old, logp_ref, adv, mask, eps, beta)
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)
    # clipped tokens: |ratio - 1| > eps
    ratios = [math.exp(a - b) for a, b, m in zip(logp.flatten(), logp_old.flatten(), mask.flatten()) if m]
    assert clip.item() == pytest.approx(sum(abs(r - 1) > eps for r in ratios) / 5)


def test_kl_zero_when_policy_equals_reference():
    logp = torch.randn(4, 7)
    _, kl, _ = igpo.grpo_loss(logp, logp, logp.clone(), torch.randn(4), torch.ones(4, 7, dtype=torch.bool), 0.2, 0.5)
    assert kl.item() == 0.0


def test_eos_tail_not_in_loss(tokenizer):
    eot, eos = tokenizer.convert_tokens_to_ids(sft.EOT), tokenizer.eos_token_id
    end_ids = torch.tensor([eot, eos])
    c = torch.tensor([[20, 21, eot, eos, eos, eos], [20, 21, 22, 23, 24, 25], [eos, 30, 31, eos, 32, 33]])
    assert igpo.completion_mask(c, end_ids).tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
    # changing log-probs in the tail changes nothing
    logp = torch.randn(3, 6)
    mask = igpo.completion_mask(c, end_ids)
    loss1, _, _ = igpo.grpo_loss(logp, logp - 0.1, logp, torch.tensor([1.0, -1, 0.5]), mask, 0.2, 0.0)
    logp2 = logp.clone()
    logp2[~mask] += 5
    loss2, _, _ = igpo.grpo_loss(logp2, logp - 0.1, logp, torch.tensor([1.0, -1, 0.5]), mask, 0.2, 0.0)
    assert loss1.item() == loss2.item()


@pytest.fixture(scope="module")
def tiny_init(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("init")
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mu", [1, 2])
def test_end_to_end_short_run(tiny_init, tmp_path, mu):
    out = tmp_path / "igpo"
    igpo.main(["--model", tiny_init, "--out_dir", str(out), "--max_steps", "2", "--batch_prompts", "2",
               "--num_generations", "4", "--gen_length", "16", "--block_length", "8", "--diffusion_steps", "8",
               "--num_iterations", str(mu), "--limit", "0", "--save_every", "1"])
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert set(rows[0]) == {"step", "heldout"} and rows[0]["step"] == 0  # the held-out curve's first point
    rows = rows[1:]
    keys = {"step", "reward", "all_wrong", "all_wrong_after", "inpainted_groups", "replaced", "hint_frac",
            "entropy", "loss", "kl", "clip_frac", "grad_norm", "lr", "seconds"}
    assert [r["step"] for r in rows] == [1, 2] and all(keys <= set(r) for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert json.load(open(out / "args.json"))["num_iterations"] == mu
    model, _, _ = sft.load_model(str(out))  # the checkpoint loads back
    assert model is not None


def test_measurements_use_the_exact_schedule_whatever_the_rollouts_use(tiny_init, tmp_path, monkeypatch):
    """--confidence_threshold and --kv_cache change how rollouts are sampled; the run's measurements (greedy
    accuracy before and after, the held-out curve) sample with the exact schedule, so that eval_after.json of
    a run with the levers and one without compare paired on the same footing. (The embedded model has no
    cache: its rollouts here are run without one, as recorded; a measurement asking for one would fail.)"""
    used, real = [], igpo.evaluate
    monkeypatch.setattr(igpo, "evaluate", lambda *a, **k: used.append(a[5]) or real(*a, **k))
    rollouts, real_generate = [], igpo.generate
    monkeypatch.setattr(igpo, "generate", lambda m, x, sampler, *a, **k: rollouts.append(sampler) or
                        real_generate(m, x, sampler._replace(kv_cache=False), *a, **k))
    igpo.main(["--model", tiny_init, "--out_dir", str(tmp_path / "igpo"), "--max_steps", "1", "--batch_prompts", "2",
               "--num_generations", "2", "--gen_length", "16", "--block_length", "8", "--diffusion_steps", "8",
               "--limit", "4", "--heldout_every", "1", "--confidence_threshold", "0.9", "--kv_cache"])
    assert len(used) == 4  # before, step 0's held-out point, step 1's, after
    assert all(s.confidence_threshold == 0.0 and not s.kv_cache for s in used)
    assert {s.temperature for s in used} == {0.0, 1.2}
    assert rollouts and all(s.confidence_threshold == 0.9 and s.kv_cache for s in rollouts)


def test_summarize_matches_hand_computation(tmp_path):
    rows = [{"step": s, "reward": r, "all_wrong": w, "all_wrong_after": wa, "replaced": k, "loss": l, "kl": kl,
             "seconds": 2.0} for s, r, w, wa, k, l, kl in
            [(1, .1, .5, 0, 4, .3, .01), (2, .2, .5, .25, 2, -.7, .02), (3, .3, 0, 0, 0, .1, .0), (4, .5, .25, 0, 1, .2, .05)]]
    rows[1]["heldout"], rows[3]["heldout"] = 0.3, 0.4  # held-out checks at steps 0, 2 and 4
    rows.insert(0, {"step": 0, "heldout": 0.25})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = igpo.summarize(str(tmp_path))
    assert s["steps"] == 4 and s["all_wrong"] == 0.3125 and s["all_wrong_after"] == 0.0625
    assert s["reward_by_quarter"] == [.1, .2, .3, .5] and s["replaced_per_step"] == 1.75
    assert s["heldout"] == [0.25, 0.3, 0.4] and s["max_kl"] == 0.05 and s["train_seconds"] == 8.0


def test_end_of_run_prints_one_rescue(tmp_path, capsys):
    """Issue 22.4: the run ends by showing one rescued group from example.json: question, hint canvas with its
    masked positions, the inpainted answer, rewards and advantages after the swap, the entropy filter's count."""
    ex = {"step": 3, "question": "Ben has 17 coins. How many coins after 1 day?", "inpainted_correct": [False, True],
          "hint_canvases": ["17-3=_<|eot_id|>", "___=14\n_<|eot_id|>"], "inpainted": ["x", "17-3=14\n\\boxed{14}<|eot_id|>!"],
          "replaced": 1, "new_rewards": [1.0, 0.0], "advantages": [0.5, -0.5],
          "hint_positions": [[3, 4, 5], []], "kept_hint_positions": [[4], []]}
    (tmp_path / "example.json").write_text(json.dumps(ex))
    igpo.print_example(str(tmp_path))
    out = capsys.readouterr().out
    assert "(step 3): Ben has 17 coins." in out and "all 2 samples wrong" in out
    assert "hint canvas: ___=14⏎_\n" in out  # the right sample's canvas, cut at the end token
    assert "inpainted:   17-3=14⏎\\boxed{14}  (right" in out
    assert "rewards [1.0, 0.0], advantages [0.5, -0.5]" in out and "keeps 1 of its 3 hint tokens" in out
    igpo.print_example(str(tmp_path / "none"))  # a run with nothing to rescue says so
    assert "no all-wrong group was rescued" in capsys.readouterr().out


def test_checkpoint_keeps_files_written_between_saves(tokenizer, tmp_path):
    """igpo writes eval_before.json before its first checkpoint; the checkpoint's folder swap must keep it."""
    import argparse
    import os
    out = str(tmp_path / "run")
    os.makedirs(out)
    for name in ("metrics.jsonl", "eval_before.json"):
        open(os.path.join(out, name), "w").write("{}\n")
    sft.save_checkpoint(out, tiny_model(tokenizer), tokenizer, argparse.Namespace(), None)
    assert sorted(n for n in os.listdir(out) if n.endswith(("json", "jsonl")) and n.startswith(("eval", "metrics"))) \
        == ["eval_before.json", "metrics.jsonl"]


def test_rl_prompts_are_not_the_sft_problems():
    # RL draws its embedded problems from a stream of its own. Before, it re-read the first rows of SFT's stream,
    # so every RL prompt was a problem SFT had trained on. What overlap remains is chance: a 20,000-problem SFT set
    # covers about a fifth of the training problems there are (measured: 18.5% for seed 0).
    args = igpo.get_args(["--seed", "0"])
    rl_questions = [q for q, _, _ in igpo.load_rl_data(args)]
    sft_questions = set(sft.toy_dataset("train", 20000, seed=0)["question"])
    assert len(rl_questions) == 1000
    assert sum(q in sft_questions for q in rl_questions) / len(rl_questions) < 0.3
    # and RL's stream follows --seed, as SFT's does
    other = [q for q, _, _ in igpo.load_rl_data(igpo.get_args(["--seed", "1"]))]
    assert other != rl_questions


@pytest.mark.parametrize("argv,message", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),  # every advantage would be 0
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--eta_low", "0.7", "--eta_high", "0.2"], "need 0 <= eta_low <= eta_high <= 1"),
    (["--batch_prompts", "3", "--grad_accum", "2"], "must be divisible by grad_accum"),
    (["--confidence_threshold", "1.5"], "confidence_threshold must be in [0, 1]"),
])
def test_settings_that_cannot_mean_anything_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        igpo.get_args(argv)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_lora_on_the_random_embedded_model_is_refused(tmp_path):
    """The embedded model is built at random: an adapter over it would name no base it could be loaded onto."""
    with pytest.raises(SystemExit) as e:
        igpo.main(["--model", "toy", "--lora_r", "4", "--out_dir", str(tmp_path / "o"), "--limit", "0",
                   "--max_steps", "1"])
    assert str(e.value).startswith("error: ") and "--lora_r needs a saved base model" in str(e.value)
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("script,flag", [("igpo", "--init"), ("igpo", "--steps"), ("igpo", "--eval_limit"),
                                         ("eval", "--batch_size")])
def test_removed_flags_are_argparse_errors(script, flag, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).get_args([flag, "1"])
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_stop_rule_needs_the_embedded_task():
    assert sft.get_args([]).stop_all_wrong == 0.35 and sft.get_args(["--dataset", "d.jsonl"]).stop_all_wrong == 0
    with pytest.raises(SystemExit) as e:
        sft.get_args(["--dataset", "d.jsonl", "--stop_all_wrong", "0.3"])
    assert str(e.value).startswith("error: --stop_all_wrong needs the embedded task")
