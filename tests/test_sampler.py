"""generate() against an independent, straightforward implementation of LLaDA's reference sampler, plus the
properties inpainting relies on."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sft
from conftest import tiny_model
from eval import Sampler, generate, num_transfer_tokens


def reference_generate(model, prompt, gen_length, block_length, steps, mask_id):
    """LLaDA's generate() at temperature 0, written the obvious way: full softmax over every position, a
    Python loop over rows for top-k, confidence of the argmax token. One prompt (1, P), no padding. Like ours
    (NOTES.md deviation), the mask token is never a candidate."""
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    nblocks = gen_length // block_length
    per_block = steps // nblocks
    for nb in range(nblocks):
        end = P + (nb + 1) * block_length
        n_masked = int((x[0, P + nb * block_length:end] == mask_id).sum())
        schedule = [n_masked // per_block + (1 if i < n_masked % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model(x).logits.clone()
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(-1)
            p = F.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            x0 = torch.where(mask_index, x0, x)
            transfer = torch.zeros_like(x, dtype=torch.bool)
            for j in range(x.shape[0]):
                _, sel = torch.topk(confidence[j], k=schedule[i])
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x


def prompt_ids(tokenizer, text):
    return torch.tensor([tokenizer(sft.make_prompt(tokenizer, text, True), add_special_tokens=False).input_ids])


@pytest.mark.parametrize("gen_length,block_length,steps", [(16, 16, 8), (16, 4, 8), (24, 8, 6), (12, 4, 12)])
def test_greedy_matches_reference(model, tokenizer, facts, gen_length, block_length, steps):
    mask_id = tokenizer.mask_token_id
    for text in ["Ann has 3 pens. How many pens now?", "Jo has 41 eggs. Sells 9. How many eggs now?"]:
        prompt = prompt_ids(tokenizer, text)
        ours = generate(model, prompt, Sampler(gen_length, block_length, steps, 0.0, False), facts)
        ref = reference_generate(model, prompt, gen_length, block_length, steps, mask_id)
        assert torch.equal(ours, ref)
        assert not (ours == mask_id).any()


def test_schedule_is_even_with_remainder_first():
    mask_index = torch.zeros(3, 8, dtype=torch.bool)
    mask_index[0, :7] = True
    mask_index[1, :2] = True
    sched = num_transfer_tokens(mask_index, 3)
    assert sched.tolist() == [[3, 2, 2], [1, 1, 0], [0, 0, 0]]


def test_hints_fixed_and_schedule_followed(model, tokenizer, facts, monkeypatch):
    """Hint tokens never change; every other position ends unmasked; each step commits exactly the
    scheduled number of non-hint tokens in the current block and nothing outside it."""
    mask_id, L, Lb, steps = tokenizer.mask_token_id, 16, 8, 8
    prompts = torch.cat([prompt_ids(tokenizer, "Ann has 3 pens. How many?")] * 2)
    hints = torch.full((2, L), mask_id)
    hints[0, [1, 2, 3, 9, 10]] = torch.tensor(tokenizer("12+5=1", add_special_tokens=False).input_ids)
    hints[1, 4:8] = torch.tensor(tokenizer("abcd", add_special_tokens=False).input_ids)  # a fully... half block
    canvases = []
    real_forward = model.forward

    def recording_forward(x, **kw):
        canvases.append(x[:, prompts.shape[1]:].clone())
        return real_forward(x, **kw)

    monkeypatch.setattr(model, "forward", recording_forward)
    out = generate(model, prompts, Sampler(L, Lb, steps, 0.0, False), facts, hints)
    monkeypatch.undo()
    ans = out[:, prompts.shape[1]:]
    is_hint = hints != mask_id
    assert torch.equal(ans[is_hint], hints[is_hint])
    assert not (ans == mask_id).any()
    canvases.append(ans)
    per_block = steps // (L // Lb)
    for step in range(steps):
        before, after = canvases[step], canvases[step + 1]
        changed = before != after
        assert not changed[is_hint].any()
        blk = step // per_block
        outside = torch.ones(L, dtype=torch.bool)
        outside[blk * Lb:(blk + 1) * Lb] = False
        assert not changed[:, outside].any()
        n_free = (~is_hint[:, blk * Lb:(blk + 1) * Lb]).sum(1)  # masked at the block start
        expected = n_free // per_block + ((step % per_block) < n_free % per_block).long()
        assert changed.sum(1).tolist() == expected.tolist()


def test_batch_invariance(model, tokenizer, facts):
    """A row's greedy output does not depend on the other rows of its batch."""
    texts = ["Ann has 3 pens. How many?", "Jo has 41 eggs. How many?", "Max has 2 eggs. How many?"]
    seqs = [tokenizer(sft.make_prompt(tokenizer, t, True), add_special_tokens=False).input_ids for t in texts]
    assert len({len(s) for s in seqs}) == 1  # one sampler call takes prompts of one length (no padding)
    batched = generate(model, torch.tensor(seqs), Sampler(16, 8, 8, 0.0, False), facts)
    for i, s in enumerate(seqs):
        alone = generate(model, torch.tensor([s]), Sampler(16, 8, 8, 0.0, False), facts)
        assert torch.equal(batched[i, -16:], alone[0, -16:])


def test_temperature_sampling_reproducible_with_generator(model, tokenizer, facts):
    prompt = torch.cat([prompt_ids(tokenizer, "Ann has 3 pens. How many?")] * 4)
    sampler = Sampler(16, 8, 8, 1.0, False)
    a = generate(model, prompt, sampler, facts, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, sampler, facts, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompt, sampler, facts, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r) for r in a[:, -16:].tolist()}) > 1  # samples of one prompt differ from each other


@pytest.mark.parametrize("L,B,steps", [(10, 4, 4), (16, 4, 6), (0, 4, 4)])
def test_bad_lengths_give_one_line_errors(model, tokenizer, facts, L, B, steps):
    with pytest.raises(SystemExit, match="must be a positive multiple"):
        generate(model, prompt_ids(tokenizer, "x"), Sampler(L, B, steps, 0.0), facts)


# ---------------------------------------------------------------- early exit (end_ids)

class Scripted(torch.nn.Module):
    """A tiny model pushed (+1000 on the logit) towards a per-row script of answer tokens: script[j] >= 0 forces
    that token at answer position j, -1 leaves it to the tiny model, which may then not end the answer there.
    A row is recognised by its first prompt token, so its script follows it when other rows leave the batch.
    Counts forward calls and the rows they carry."""

    def __init__(self, inner, P, scripts, end_ids):
        super().__init__()
        self.inner, self.P, self.scripts, self.end_ids, self.config = inner, P, scripts, end_ids, inner.config
        self.calls, self.rows = 0, 0

    def get_output_embeddings(self):
        return None  # logits_at then slices the full logits: the script is written in sequence positions

    def forward(self, x):
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        logits = self.inner(x).logits.clone()
        for r in range(x.shape[0]):
            script = self.scripts[int(x[r, 0])]
            free = (script < 0).nonzero().flatten() + self.P
            logits[r, free[:, None], self.end_ids] -= 1000.0  # the answer ends only where the script says
            j = (script >= 0).nonzero().flatten()
            logits[r, self.P + j, script[j]] += 1000.0
        return SimpleNamespace(logits=logits)


def scripted_rows(tokenizer, L, P=6):
    """Five rows: <|eot_id|> in block 0 (then a box the reward must not read), <|eot_id|> in block 1, EOS in
    block 1, <|eot_id|> in the last block, no end at all. Blocks of 8."""
    eot, eos = tokenizer.convert_tokens_to_ids(sft.EOT), tokenizer.eos_token_id
    box = tokenizer("\\boxed{8}", add_special_tokens=False).input_ids
    scripts = {}
    for first, end_at, end in [(40, 5, eot), (41, 12, eot), (42, 9, eos), (43, L - 2, eot), (44, None, None)]:
        s = torch.full((L,), -1)
        if end is not None:
            s[end_at] = end
            s[end_at + 1:end_at + 1 + len(box)] = torch.tensor(box)[:L - end_at - 1]
        scripts[first] = s
    g = torch.Generator().manual_seed(0)
    prompts = torch.cat([torch.tensor(list(scripts))[:, None], torch.randint(7, 100, (5, P - 1), generator=g)], 1)
    return prompts, scripts, torch.tensor([eot, eos])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_early_exit_same_tokens_rewards_loss_mask_and_generator(tokenizer, facts, temperature):
    from eval import completion_mask, grade
    L, Lb, steps = 32, 8, 16
    prompts, scripts, end_ids = scripted_rows(tokenizer, L)
    outs, states, rows = [], [], []
    for ends in [None, end_ids]:
        model = Scripted(tiny_model(tokenizer, seed=3), prompts.shape[1], scripts, end_ids)
        g = torch.Generator().manual_seed(7)
        sampler = Sampler(L, Lb, steps, temperature, early_exit=ends is not None)
        outs.append(generate(model, prompts, sampler, facts, generator=g)[:, -L:])
        states.append(g.get_state())
        rows.append(model.rows)
    full, early = outs
    keep = completion_mask(full, end_ids)
    assert torch.equal(keep, completion_mask(early, end_ids))  # the loss mask
    assert torch.equal(full[keep], early[keep])  # every token up to and including the first end token
    assert (early[~keep] == tokenizer.eos_token_id).all() and (~keep[:4]).any(1).all() and keep[4].all()
    assert (full[0, 6:15] != tokenizer.eos_token_id).any()  # the full sampler wrote the box after the end
    texts = [tokenizer.batch_decode(o) for o in outs]
    assert [grade(t, "8", "toy") for t in texts[0]] == [grade(t, "8", "toy") for t in texts[1]]
    assert torch.equal(states[0], states[1])  # later calls on the same generator are unchanged too
    # rows leave after the block holding their end: 4 + 8 + 8 + 16 + 16 row-forwards instead of 5 x 16
    assert rows == [80, 52]


def test_early_exit_with_hints(tokenizer, facts):
    """A hint after a row's end does not keep it alive: the row leaves after the block holding its end, and
    the hint becomes EOS like the rest of the tail (nothing after the end is read by reward or loss). Hints
    before the end are kept; a hinted end token ends its row once its block is complete."""
    from eval import completion_mask
    L, Lb, steps = 32, 8, 16
    prompts, scripts, end_ids = scripted_rows(tokenizer, L)
    mask_id = tokenizer.mask_token_id
    hints = torch.full((5, L), mask_id)
    hints[0, 17:20] = torch.tensor([30, 31, 32])  # after row 0's end (position 5), in block 2
    hints[3, 2:5] = torch.tensor([33, 34, 35])  # before row 3's end
    hints[:, 24:30] = 36  # block 3: only 2 positions left to fill per row
    hints[4, 28] = end_ids[0]  # row 4's end is a hint in the last block: it ends only once block 3 is done
    outs, rows = [], []
    for ends in [None, end_ids]:
        model = Scripted(tiny_model(tokenizer, seed=3), prompts.shape[1], scripts, end_ids)
        sampler = Sampler(L, Lb, steps, 1.0, early_exit=ends is not None)
        outs.append(generate(model, prompts, sampler, facts, hints, torch.Generator().manual_seed(7))[:, -L:])
        rows.append(model.rows)
    full, early = outs
    keep = completion_mask(full, end_ids)
    assert torch.equal(full[keep], early[keep]) and torch.equal(keep, completion_mask(early, end_ids))
    assert (full[0, 17:20] == hints[0, 17:20]).all() and (early[0, 17:20] == tokenizer.eos_token_id).all()
    assert (early[3, 2:5] == hints[3, 2:5]).all() and keep[4, :29].all() and not keep[4, 29:].any()
    # block 3 has 2 masked positions per row over 4 steps: its last 2 steps commit nothing and are skipped in
    # both modes (5 rows x 14 steps); early exit: rows 0-2 leave after blocks 0, 1, 1 (4 + 8 + 8 + 14 + 14)
    assert rows == [70, 48]


def test_fully_hinted_block_costs_no_forward(tokenizer, facts):
    """A step at which no row commits anything skips its forward pass, with or without early exit."""
    L, Lb, steps = 16, 4, 16  # 4 blocks of 4 steps; block 1 fully hinted in every row
    prompts, scripts, end_ids = scripted_rows(tokenizer, L)
    scripts = {k: torch.full((L,), -1) for k in scripts}  # no row ends
    hints = torch.full((5, L), tokenizer.mask_token_id)
    hints[:, 4:8] = 36
    outs, calls = [], []
    for ends in [None, end_ids]:
        model = Scripted(tiny_model(tokenizer, seed=3), prompts.shape[1], scripts, end_ids)
        outs.append(generate(model, prompts, Sampler(L, Lb, steps, 0.0, ends is not None), facts, hints))
        calls.append(model.calls)
    assert torch.equal(outs[0], outs[1]) and calls == [12, 12]  # not 16: block 1 is skipped


def test_early_exit_flag_default_on_same_name_in_both_scripts():
    import eval as ev
    import igpo
    for get_args in (ev.get_args, igpo.get_args):
        assert get_args([]).early_exit is True and get_args(["--no-early_exit"]).early_exit is False


def test_evaluate_saves_the_full_eos_padded_canvas(tokenizer, facts):
    """With early exit the saved generation still has all gen_length tokens, EOS after the end (d1's layout)."""
    from eval import evaluate
    L = 32
    prompt = tokenizer(sft.make_prompt(tokenizer, "Ann has 3 pens.", True), add_special_tokens=False).input_ids
    script = torch.full((L,), -1)
    script[5] = tokenizer.convert_tokens_to_ids(sft.EOT)
    end_ids = torch.tensor([script[5], tokenizer.eos_token_id])
    model = Scripted(tiny_model(tokenizer, seed=3), len(prompt), {prompt[0]: script}, end_ids)
    records, _ = evaluate(model, tokenizer, facts, [("Ann has 3 pens.", "3")] * 2, "toy", Sampler(L, 8, 16, 0.0))
    for r in records:
        text = r["generations"]
        assert text.endswith(sft.EOT + sft.EOS * (L - 6)) and sft.MASK not in text
    assert model.rows == 2 * 4  # one block of 4 steps per row


# ---------------------------------------------------------------- --confidence_threshold (NOTES.md §3 item 25)

THREE_PROMPTS = ["Ann has 3 pens. How many?", "Jo has 41 eggs. How many?", "Max has 2 eggs. How many?"]


def three_prompts(tokenizer):
    return torch.cat([prompt_ids(tokenizer, t) for t in THREE_PROMPTS])  # (3, P): one length, no padding


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_threshold_zero_is_the_exact_schedule_tokens_and_generator(model, tokenizer, facts, temperature):
    """tau = 0 is the paper's sampler bit for bit: greedy tokens equal the reference sampler's, and at any
    temperature the noise is drawn for every row at each of the `steps` steps and no more, so the generator
    ends where one that drew exactly that noise ends."""
    from eval import logits_size
    L, Lb, steps = 16, 4, 8
    prompts = three_prompts(tokenizer)
    g = torch.Generator().manual_seed(5)
    out = generate(model, prompts, Sampler(L, Lb, steps, temperature, False, 0, 0.0), facts, generator=g)
    expected = torch.Generator().manual_seed(5)
    for _ in range(steps if temperature else 0):
        torch.rand((3, Lb, logits_size(model)), dtype=torch.float64, generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())
    if not temperature:
        for r in range(3):
            ref = reference_generate(model, prompts[r:r + 1], L, Lb, steps, tokenizer.mask_token_id)
            assert torch.equal(out[r:r + 1], ref)


def recorded_commits(monkeypatch):
    """Every call of eval.commit during a generate(): (block before, confidences, block after)."""
    import eval as ev
    calls, real_commit = [], ev.commit

    def recording_commit(block, x0, confidence, k, mask_id):
        after = real_commit(block, x0, confidence, k, mask_id)
        calls.append((block.clone(), confidence.clone(), after.clone()))
        return after

    monkeypatch.setattr(ev, "commit", recording_commit)
    return calls


def check_threshold_steps(calls, tau, mask_id):
    """Each step commits exactly the masked positions with confidence >= tau when a row has some, else exactly
    one, its most confident masked position; nothing else of the block changes (hints, committed tokens).
    Returns how many row-steps took each branch."""
    several = single = 0
    for before, confidence, after in calls:
        masked, changed = before == mask_id, after != before
        assert not changed[~masked].any()  # a hint or a committed token never changes
        sure = masked & (confidence >= tau)  # (R, Lb)
        for r in range(len(before)):
            assert masked[r].any()  # a row takes a step only while its block holds a mask
            if sure[r].any():
                assert torch.equal(changed[r], sure[r])
                several += 1
            else:
                best = torch.where(masked[r], confidence[r], float("-inf")).argmax()
                assert changed[r].nonzero().flatten().tolist() == [best]
                single += 1
    return several, single


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_threshold_commits_the_masked_positions_at_least_tau_and_never_a_hint(model, tokenizer, facts,
                                                                              temperature, monkeypatch):
    mask_id, L, Lb, steps = tokenizer.mask_token_id, 16, 8, 8
    prompts = three_prompts(tokenizer)
    hints = torch.full((3, L), mask_id)
    hints[0, [1, 2, 3, 9, 10]] = torch.tensor(tokenizer("12+5=1", add_special_tokens=False).input_ids)
    hints[1, 4:8] = torch.tensor(tokenizer("abcd", add_special_tokens=False).input_ids)
    counts = [0, 0]
    for tau in (0.15, 0.25, 0.35):  # the tiny model's confidences lie between about 0.07 and 0.4
        calls = recorded_commits(monkeypatch)
        sampler = Sampler(L, Lb, steps, temperature, False, 0, tau)
        out = generate(model, prompts, sampler, facts, hints, torch.Generator().manual_seed(0))[:, -L:]
        monkeypatch.undo()
        assert torch.equal(out[hints != mask_id], hints[hints != mask_id]) and not (out == mask_id).any()
        counts = [a + b for a, b in zip(counts, check_threshold_steps(calls, tau, mask_id))]
        # tau equal to a confidence the first step sees (the second highest of row 0): >= commits it too
        first = calls[0][1][0][calls[0][0][0] == mask_id].sort(descending=True).values[1].item()
        calls = recorded_commits(monkeypatch)
        generate(model, prompts, sampler._replace(confidence_threshold=first), facts, hints,
                 torch.Generator().manual_seed(0))
        monkeypatch.undo()
        check_threshold_steps(calls, first, mask_id)
    assert counts[0] and counts[1]  # both branches were taken: several tokens at once, and one only


def test_threshold_takes_one_token_a_step_when_nothing_is_confident(tokenizer, facts):
    """An untrained model is never confident: each step commits exactly one token, so a block takes all
    block_length steps (more than the schedule's), and the canvas is still complete."""
    model = sft.build_toy_model(tokenizer, hidden=32, layers=2, heads=2).eval()  # near-uniform predictions
    rows = [0]
    model.register_forward_pre_hook(lambda module, a: rows.__setitem__(0, rows[0] + a[0].shape[0]))
    out = generate(model, three_prompts(tokenizer), Sampler(16, 8, 4, 1.0, False, 0, 0.5), facts,
                   generator=torch.Generator().manual_seed(0))
    assert not (out == tokenizer.mask_token_id).any() and rows[0] == 3 * 16


def test_threshold_keeps_early_exit_exact(tokenizer, facts):
    """With tau > 0 finished rows still leave the batch without changing any token up to each row's end, or
    the generator's state."""
    from eval import completion_mask
    L, Lb, steps = 32, 8, 16
    prompts, scripts, end_ids = scripted_rows(tokenizer, L)
    outs, states, rows = [], [], []
    for early in (False, True):
        model = Scripted(tiny_model(tokenizer, seed=3), prompts.shape[1], scripts, end_ids)
        g = torch.Generator().manual_seed(7)
        outs.append(generate(model, prompts, Sampler(L, Lb, steps, 1.0, early, 0, 0.7), facts, generator=g)[:, -L:])
        states.append(g.get_state())
        rows.append(model.rows)
    keep = completion_mask(outs[0], end_ids)
    assert torch.equal(keep, completion_mask(outs[1], end_ids)) and torch.equal(outs[0][keep], outs[1][keep])
    assert torch.equal(states[0], states[1]) and rows[1] < rows[0]


def test_speed_flags_default_off_same_names_in_both_scripts():
    """The exact sampler is the default of both scripts; the two levers have the same flag names in each."""
    import eval as ev
    import igpo
    for get_args in (ev.get_args, igpo.get_args):
        args = get_args([])
        assert args.confidence_threshold == 0.0 and args.kv_cache is False
        args = get_args(["--confidence_threshold", "0.9", "--kv_cache"])
        assert args.confidence_threshold == 0.9 and args.kv_cache is True
    assert igpo.sampler_of(igpo.get_args([])) == Sampler(48, 8, 24, 1.2, True, 0)  # as before the two levers
