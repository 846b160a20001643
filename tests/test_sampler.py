"""generate() against an independent, straightforward implementation of LLaDA's reference sampler, plus the
properties inpainting relies on."""
import pytest
import torch
import torch.nn.functional as F

import sft
from eval import generate, num_transfer_tokens


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
def test_greedy_matches_reference(model, tokenizer, gen_length, block_length, steps):
    mask_id = tokenizer.mask_token_id
    for text in ["Ann has 3 pens. How many pens now?", "Jo has 41 eggs. Sells 9. How many eggs now?"]:
        prompt = prompt_ids(tokenizer, text)
        ours = generate(model, prompt, gen_length, block_length, steps, 0.0, mask_id)
        ref = reference_generate(model, prompt, gen_length, block_length, steps, mask_id)
        assert torch.equal(ours, ref)
        assert not (ours == mask_id).any()


def test_schedule_is_even_with_remainder_first():
    mask_index = torch.zeros(3, 8, dtype=torch.bool)
    mask_index[0, :7] = True
    mask_index[1, :2] = True
    sched = num_transfer_tokens(mask_index, 3)
    assert sched.tolist() == [[3, 2, 2], [1, 1, 0], [0, 0, 0]]


def test_hints_fixed_and_schedule_followed(model, tokenizer, monkeypatch):
    """Hint tokens never change; every other position ends unmasked; each step commits exactly the
    scheduled number of non-hint tokens in the current block and nothing outside it."""
    mask_id, L, Lb, steps = tokenizer.mask_token_id, 16, 8, 8
    prompts = torch.cat([prompt_ids(tokenizer, "Ann has 3 pens. How many?")] * 2)
    hints = torch.full((2, L), mask_id)
    hints[0, [1, 2, 3, 9, 10]] = torch.tensor(tokenizer("12+5=", add_special_tokens=False).input_ids)
    hints[1, 4:8] = torch.tensor(tokenizer("abcd", add_special_tokens=False).input_ids)  # a fully... half block
    canvases = []
    real_forward = model.forward

    def recording_forward(x, **kw):
        canvases.append(x[:, prompts.shape[1]:].clone())
        return real_forward(x, **kw)

    monkeypatch.setattr(model, "forward", recording_forward)
    out = generate(model, prompts, L, Lb, steps, 0.0, mask_id, hints=hints)
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


def test_batch_invariance_under_left_padding(model, tokenizer):
    """A row's greedy output does not depend on the other rows of its batch (padding + attention mask)."""
    mask_id = tokenizer.mask_token_id
    texts = ["Ann has 3 pens. How many?", "Jo has 41 eggs. Sells 9. Buys 12. Doubles them. How many eggs now?"]
    seqs = [tokenizer(sft.make_prompt(tokenizer, t, True), add_special_tokens=False).input_ids for t in texts]
    ids, attn = sft.left_pad(seqs, tokenizer.pad_token_id)
    batched = generate(model, ids, 16, 8, 8, 0.0, mask_id, attention_mask=attn)
    for i, s in enumerate(seqs):
        alone = generate(model, torch.tensor([s]), 16, 8, 8, 0.0, mask_id)
        assert torch.equal(batched[i, -16:], alone[0, -16:])


def test_temperature_sampling_reproducible_with_generator(model, tokenizer):
    mask_id = tokenizer.mask_token_id
    prompt = torch.cat([prompt_ids(tokenizer, "Ann has 3 pens. How many?")] * 4)
    a = generate(model, prompt, 16, 8, 8, 1.0, mask_id, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 16, 8, 8, 1.0, mask_id, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompt, 16, 8, 8, 1.0, mask_id, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r) for r in a[:, -16:].tolist()}) > 1  # samples of one prompt differ from each other


@pytest.mark.parametrize("L,B,steps", [(10, 4, 4), (16, 4, 6), (0, 4, 4)])
def test_bad_lengths_give_one_line_errors(model, tokenizer, L, B, steps):
    with pytest.raises(SystemExit, match="must be a positive multiple"):
        generate(model, prompt_ids(tokenizer, "x"), L, B, steps, 0.0, tokenizer.mask_token_id)
