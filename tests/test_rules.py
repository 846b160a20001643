"""The rules of the paper where they run: one IGPO step of igpo.main on a tiny model with a grader whose right
and wrong answers are fixed in advance, watched through the functions it calls; plus the rules that live in
one function (the clip bounds, the Gumbel draw, the hint chunks, the data order). Each test names the rule it
guards; NOTES.md §12 lists rule -> test, and tests/mutants.py breaks each rule's line to show the test fails."""
import json
import math
import os
import zlib

import pytest
import torch

import eval as evaluation
import igpo
import sft
from conftest import tiny_model

G = 8


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    """A tiny random start model and four embedded problems with distinct answers (the grader stubs key on
    the gold answer to know which prompt a completion answers)."""
    root = tmp_path_factory.mktemp("rules")
    tiny_model(tokenizer).save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    ds = sft.toy_dataset("train", 40, seed="rules")
    rows, seen = [], set()
    for r in ds:
        if r["answer"] not in seen and r["days"] >= 3:  # distinct answers; traces long enough to be hinted
            seen.add(r["answer"])
            rows.append({"question": r["question"], "trace": r["trace"], "answer": r["answer"]})
    rows = rows[:4]
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    args = ["--model", str(root / "init"), "--dataset", str(root / "rows.jsonl"), "--answer_col", "answer",
            "--batch_prompts", "4", "--num_generations", str(G), "--max_steps", "1", "--limit", "0",
            "--save_every", "100"]
    return root, args, [r["answer"] for r in rows]


def spy(monkeypatch, name, record):
    """Replace igpo.<name> by a wrapper that appends (args, kwargs, result) to record and returns the result."""
    real = getattr(igpo, name)

    def wrapper(*a, **k):
        out = real(*a, **k)
        record.append((a, k, out))
        return out
    monkeypatch.setattr(igpo, name, wrapper)


def hashed_grader(text, gold, task):
    """Right or wrong by a hash of the text: mixed groups, so advantages and gradients are not zero."""
    return zlib.crc32(text.encode()) % 3 == 0


# ---------------------------------------------------------------------------------------------------------
# Eq. (4), (8), (10) in the step: which groups are inpainted, how many samples replace wrong ones, which
# positions the loss reads.

def test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints(setup, tmp_path,
                                                                                        monkeypatch):
    root, args, answers = setup
    # prompt 0 gets one right sample, prompt 2 all G right (its advantages are zero too, but it is not a prompt
    # the policy cannot solve: no inpainting), prompts 1 and 3 none
    own_right = {answers[0]: {0}, answers[2]: set(range(G))}
    n_calls = []

    def grader(text, gold, task):  # the step grades its B*G own samples first, in row order, then inpainted ones
        j = len(n_calls)
        n_calls.append(gold)
        if j < 4 * G:
            return j % G in own_right.get(gold, set())
        return (j - 4 * G) % G < 3  # three of every group's G inpainted samples are right

    monkeypatch.setattr(igpo, "grade", grader)
    replaced, losses, estimates = [], [], []
    spy(monkeypatch, "replace_wrong", replaced)
    spy(monkeypatch, "grpo_loss", losses)
    spy(monkeypatch, "estimate", estimates)
    igpo.main(args + ["--out_dir", str(tmp_path / "run"), "--max_replace_frac", "0.3", "--entropy_keep", "0.3",
                      "--eta_low", "1", "--eta_high", "1", "--num_iterations", "1"])
    batch = sft.batch_at(igpo.load_rl_data(igpo.get_args(args)), 4, 0, 0)  # the step's 4 prompts
    gold = [b[2] for b in batch]
    (call_args, _, (completions, reward, hint_mask, Ks)), = replaced
    groups = call_args[2]
    # Eq. (4): exactly the groups with no right sample are inpainted
    assert groups == [b for b in range(4) if gold[b] not in own_right]
    # Eq. (8): K = min(#right, floor(lambda G)) = min(3, floor(0.3 * 8)) = 2 per group, into wrong slots
    assert Ks == [2, 2]
    for b in range(4):
        assert reward[b].sum() == (2 if b in groups else len(own_right[gold[b]]))
        assert hint_mask[b * G:(b + 1) * G].any(1).sum() == (2 if b in groups else 0)
    # Eq. (10): every token up to the row's end, minus the hints the entropy filter drops; the filter ranks
    # only hints before the end: of a row's n such hints the max(1, floor(tau n)) of highest entropy stay
    entropy = estimates[0][2][1]  # (B, L) under pi_old
    valid = evaluation.completion_mask(completions, torch.tensor((5, 0)))
    expected = valid.clone()
    for row in range(4 * G):
        hints = (hint_mask[row] & valid[row]).nonzero().flatten().tolist()
        expected[row, (hint_mask[row] & ~valid[row]).nonzero().flatten()] = False
        if hints:
            k = max(1, math.floor(0.3 * len(hints)))
            ranked = sorted(hints, key=lambda i: -entropy[row // G, i].item())
            expected[row, ranked[k:]] = False
    loss_mask = losses[0][0][4]
    assert torch.equal(loss_mask, expected)
    assert (hint_mask & valid & ~loss_mask).any()  # some hints were dropped: the filter did act


def test_loss_mask_counts_only_hints_before_the_end():
    """Eq. (10) with a row whose end token comes early: hints after it are not in the loss and do not count
    towards floor(tau n) (with them counted, two hints would be kept instead of one)."""
    end_ids = (5, 0)
    # row 2: its end (padding, id 0) at position 3, a hint before it, and self-generated tokens after it, which
    # are not read either (as a sampler without early exit leaves them)
    completions = torch.tensor([[9, 9, 9, 9, 9, 5, 0, 0, 0, 0], [9, 9, 9, 0, 9, 9, 9, 9, 9, 9]])
    hint_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    entropy = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.0, 0.9, 0.9, 0.9, 0.9], [0.5] * 10])
    mask = igpo.loss_tokens(completions, hint_mask, entropy, end_ids, 0.25)
    assert mask.tolist() == [[True, False, False, False, True, True, False, False, False, False],
                             [True, True, True, True, False, False, False, False, False, False]]


# ---------------------------------------------------------------------------------------------------------
# Eq. (6): the ratio is taken against pi_old, and the reference of the KL term is the start model.

def test_mu_updates_take_the_ratio_against_pi_old(setup, tmp_path, monkeypatch):
    """pi_old is the policy at the start of each batch of rollouts, fixed for its mu updates: neither the
    current policy nor the KL reference (which is the start model: in the first step the two agree, so two
    steps are run)."""
    root, args, _ = setup
    monkeypatch.setattr(igpo, "grade", hashed_grader)
    losses = []
    spy(monkeypatch, "grpo_loss", losses)
    igpo.main(args + ["--out_dir", str(tmp_path / "run"), "--num_iterations", "3", "--lr", "1e-2", "--max_steps", "2"])
    calls = [(a[0].detach(), a[1], a[2]) for a, _, _ in losses]
    assert len(calls) == 6
    for first in (0, 3):  # each step's first update starts at ratio 1 (full fine-tuning: no dropout) ...
        (logp1, old1, _), (logp2, old2, _), (logp3, old3, _) = calls[first:first + 3]
        assert torch.equal(logp1, old1)
        assert torch.equal(old2, old1) and torch.equal(old3, old1)  # ... and pi_old is fixed for the mu updates
        assert not torch.allclose(logp2, old2) and not torch.allclose(logp3, logp2)  # while the policy moves
    logp4, old4, ref4 = calls[3]
    assert not torch.allclose(old4, ref4, atol=1e-3)  # step 2: pi_old is the moved policy, not pi_ref


@pytest.mark.parametrize("lora", ["no", "yes", "on an SFT adapter"])
def test_kl_reference_is_the_start_model(setup, tokenizer, tmp_path, monkeypatch, lora):
    """pi_ref: the start model, frozen; under LoRA the policy with its trained adapter switched off, and when
    RL starts from an SFT adapter, that adapter stays on (pi_ref is the SFT model). In the second step, taken
    after a resume from the first one's checkpoint, the policy has moved, pi_ref must not have."""
    root, args, _ = setup
    start = str(root / "init")
    if lora == "on an SFT adapter":  # an SFT stage saved as sft.py saves it, with a nonzero update
        start = str(tmp_path / "sft")
        sft_model, tok, facts = sft.load_model(str(root / "init"))
        sft_model = sft.add_lora(sft_model, 4, 8, facts.lora_targets)
        with torch.no_grad():
            for n, p in sft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        sft.save_checkpoint(start, sft_model, tok, igpo.get_args([]), None)
    monkeypatch.setattr(igpo, "grade", hashed_grader)
    estimates = []
    spy(monkeypatch, "estimate", estimates)
    extra = ["--lora_r", "4", "--lr", "5e-2"] if lora != "no" else ["--lr", "1e-2"]
    run = args + ["--model", start, "--out_dir", str(tmp_path / "run"), "--beta", "0.1", *extra]
    igpo.main(run + ["--max_steps", "1"])
    igpo.main(run + ["--max_steps", "2", "--resume"])  # pi_ref is still the start model after a resume
    old, ref = estimates[2], estimates[3]  # step 2: pi_old (with entropies), then pi_ref
    model, _, facts = sft.load_model(start)
    (_, prompts, completions, _, micro), _, logp_ref = ref[0], None, ref[2]
    with torch.no_grad():
        start = igpo.token_logps(model.eval(), prompts, completions, facts)
    assert torch.allclose(logp_ref, start, atol=1e-5)
    assert not torch.allclose(old[2][0], start, atol=1e-3)  # the policy itself did move


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation: the micro-batches' gradients add up to the full batch's.

def test_grad_accum_gives_the_full_batch_gradient(setup, tmp_path, monkeypatch):
    root, args, _ = setup
    monkeypatch.setattr(igpo, "grade", hashed_grader)
    norms = []
    for accum in ("1", "2", "4"):
        out = tmp_path / f"accum{accum}"
        igpo.main(args + ["--out_dir", str(out), "--grad_accum", accum, "--num_iterations", "1"])
        norms.append(json.loads(open(out / "metrics.jsonl").readline())["grad_norm"])
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-4) and norms[2] == pytest.approx(norms[0],
                                                                                                         rel=1e-4)


def test_rl_update_is_clipped_to_grad_clip(setup, tmp_path, monkeypatch):
    """The RL step's gradient clip: the update the optimizer applies is the step's whole gradient (both
    micro-batches), scaled to norm --grad_clip when its norm is larger and untouched when it is smaller. The
    gradient is read inside AdamW.step, when the update is made; the logged grad_norm is the raw one (before
    clipping) in both runs, which see the same rollouts."""
    root, args, _ = setup
    monkeypatch.setattr(igpo, "grade", hashed_grader)
    at_step = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        at_step.append(torch.cat([p.grad.double().flatten() for group in self.param_groups for p in group["params"]
                                  if p.grad is not None]))
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    runs = {}
    for name in ("free", "clipped"):
        clip = 1e6 if name == "free" else runs["free"][0].norm().item() / 4  # a quarter of the raw norm
        out = tmp_path / name
        at_step.clear()
        igpo.main(args + ["--out_dir", str(out), "--grad_accum", "2", "--num_iterations", "1", "--grad_clip",
                          repr(clip)])
        (grad,) = at_step
        runs[name] = (grad, json.loads(open(out / "metrics.jsonl").readline())["grad_norm"], clip)
    raw, logged, _ = runs["free"]
    assert raw.norm() > 0 and logged == pytest.approx(raw.norm().item(), rel=1e-4)  # untouched below the clip
    grad, logged, clip = runs["clipped"]
    assert logged == pytest.approx(raw.norm().item(), rel=1e-4)  # the same raw gradient, logged before clipping
    assert grad.norm().item() == pytest.approx(clip, rel=1e-4)  # the update's norm is the clip ...
    assert torch.allclose(grad, raw * (clip / raw.norm()), rtol=1e-3, atol=1e-9)  # ... in the raw direction


# ---------------------------------------------------------------------------------------------------------
# Eq. (6): the clip acts at exactly 1 - eps and 1 + eps, on the side the advantage's sign selects.

@pytest.mark.parametrize("adv,ratio,moves", [(1.0, 1.19, True), (1.0, 1.21, False), (1.0, 0.7, True),
                                              (-1.0, 0.81, True), (-1.0, 0.79, False), (-1.0, 1.3, True)])
def test_clip_bounds_on_both_sides(adv, ratio, moves):
    logp_old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, _, clip = igpo.grpo_loss(logp, logp_old, logp_old, torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool),
                                   0.2, 0.0)
    loss.backward()
    assert (logp.grad.abs().item() > 0) == moves  # clipped: no gradient through the ratio
    assert loss.item() == pytest.approx(-min(ratio * adv, max(min(ratio, 1.2), 0.8) * adv), rel=1e-6)
    assert clip.item() == float(abs(ratio - 1) > 0.2)


# ---------------------------------------------------------------------------------------------------------
# The sampler at temperature > 0 draws from softmax(l / T), as LLaDA's add_gumbel_noise does, and never draws
# the mask token or an id the tokenizer cannot decode.

def test_gumbel_draw_matches_lladas_for_the_same_uniforms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=g) * 3
    for T in (0.5, 1.0, 1.2):
        x0, conf = evaluation.sample_tokens(logits, torch.arange(3), 3, T, torch.Generator().manual_seed(1))
        u = torch.rand(3, 5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        llada = (logits.double().exp() / (-torch.log(u)) ** T).argmax(-1)  # LLaDA's add_gumbel_noise + argmax
        assert torch.equal(x0, llada)
        assert torch.allclose(conf, logits.double().softmax(-1).gather(-1, x0[..., None])[..., 0])


def test_temperature_draws_follow_softmax_over_t():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]).repeat(1, 4000, 1)  # 4000 positions, one distribution
    T = 1.2
    x0, _ = evaluation.sample_tokens(logits, torch.arange(1), 1, T, torch.Generator().manual_seed(0))
    freq = torch.bincount(x0.flatten(), minlength=4).double() / x0.numel()
    expected = (logits[0, 0].double() / T).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_sampler_never_draws_the_mask_or_an_undecodable_id(tokenizer, facts):
    """The head has 3 rows more than the tokenizer has ids (as Dream's): the model favours the mask, then the
    first id the tokenizer cannot decode (facts.n_tokens), then the last one, then the last id it can decode;
    only that last decodable id may be drawn, greedy or at a temperature."""
    class Favours(torch.nn.Module):
        def __init__(self, V):
            super().__init__()
            self.V, self.config = V, type("C", (), {"vocab_size": V})()

        def get_output_embeddings(self):
            return None

        def forward(self, x):
            logits = torch.zeros(*x.shape, self.V)
            logits[..., facts.mask_id] = 50.0
            logits[..., facts.n_tokens] = 45.0
            logits[..., self.V - 1] = 40.0
            logits[..., facts.n_tokens - 1] = 35.0
            return type("O", (), {"logits": logits})()

    assert facts.n_tokens == len(tokenizer)
    model = Favours(len(tokenizer) + 3)
    prompt = torch.tensor([[7, 8, 9]] * 2)
    for T in (0.0, 1.0):
        out = evaluation.generate(model, prompt, evaluation.Sampler(8, 4, 4, T, False), facts,
                                  generator=torch.Generator().manual_seed(0))
        assert (out[:, 3:] == facts.n_tokens - 1).all()


# ---------------------------------------------------------------------------------------------------------
# Eq. (7): hint chunks of every size from s_min to s_max; the data order: a new permutation every epoch.

def test_hint_chunks_take_every_size_from_s_min_to_s_max():
    g = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(200):
        chunks = igpo.trace_chunks(40, 3, 6, g)
        assert chunks[0][0] == 0 and chunks[-1][1] == 40  # consecutive, covering the trace
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        sizes |= {e - s for s, e in chunks[:-1]}  # the last one may be cut short by the trace's end
    assert sizes == {3, 4, 5, 6}


def test_every_epoch_draws_a_new_order_of_all_prompts():
    data = [(f"q{i}", "t", str(i)) for i in range(12)]  # 3 batches of 4 per epoch
    epochs = [[row[0] for k in range(3 * e, 3 * e + 3) for row in sft.batch_at(data, 4, k, 0)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(q for q, _, _ in data)  # each prompt once per epoch
    assert epochs[0] != epochs[1] != epochs[2]


def test_schedule_steps_once_per_batch_of_rollouts(setup, tmp_path, monkeypatch):
    """NOTES.md §3 item 13: the LR schedule counts batches of rollouts (what --max_steps, --warmup_steps and
    the logs count), not the mu optimizer updates inside each."""
    root, args, _ = setup
    monkeypatch.setattr(igpo, "grade", hashed_grader)
    out = tmp_path / "run"
    igpo.main(args + ["--out_dir", str(out), "--max_steps", "2", "--num_iterations", "3", "--warmup_steps", "5",
                      "--lr", "1e-3"])
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3 * 2 / 5, 1e-3 * 3 / 5])  # after 1 and 2 schedule steps
