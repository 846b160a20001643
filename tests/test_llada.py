"""The paths the LLaDA-8B-Instruct commands of the README take, run through LLaDA's own modeling code: a tiny
random LLaDA built from the vendored hub files (tests/llada/, conftest.build_tiny_llada), with the real
classes, vocabulary and special-token ids."""
import torch

import igpo
import sft

LLADA_LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}


def llada_batch(tokenizer, G=2, L=8, seed=0):
    """Two prompts of different lengths (left-padded) and random completions of ordinary characters."""
    qs = ["What is 2+3?", "Tom has 12 apples and eats 5. How many are left?"]
    prompts, attn = sft.left_pad([tokenizer(sft.make_prompt(tokenizer, q, False), add_special_tokens=False).input_ids
                                  for q in qs], tokenizer.pad_token_id)
    completions = torch.randint(0, 96, (len(qs) * G, L), generator=torch.Generator().manual_seed(seed))
    return prompts, attn, completions


def loss_and_grads(model, mask_id, prompts, attn, completions, G):
    model.zero_grad(set_to_none=True)
    logp = igpo.token_logps(model, prompts, attn, completions, G, mask_id)
    loss, _, _ = igpo.grpo_loss(logp, logp.detach() - 0.05, logp.detach() + 0.05, torch.linspace(-1, 1, logp.shape[0]),
                                torch.ones_like(logp, dtype=torch.bool), 0.2, 0.01)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_ckpt_on_llada_recomputes_blocks_with_same_grads(tiny_llada):
    """Issue 13.1: --grad_ckpt used to stop LLaDA at startup (no supports_gradient_checkpointing)."""
    plain, tok = sft.load_model(tiny_llada, trust_remote_code=True)
    ckpt, _ = sft.load_model(tiny_llada, trust_remote_code=True)
    sft.enable_grad_ckpt(ckpt)
    mask_id = tok.convert_tokens_to_ids(sft.MASK)
    calls = []
    ckpt.model.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute stops early: no post-hook
    prompts, attn, completions = llada_batch(tok)
    loss0, grads0 = loss_and_grads(plain.train(), mask_id, prompts, attn, completions, 2)
    loss1, grads1 = loss_and_grads(ckpt.train(), mask_id, prompts, attn, completions, 2)
    assert len(calls) == 2  # block 0 ran again during backward
    assert torch.allclose(loss0, loss1, atol=1e-6) and grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-6), n


def test_lora_on_llada_adapts_the_seven_block_projections_not_the_head(tiny_llada):
    """Issue 13.3: the target name ff_out also matched the vocabulary head model.transformer.ff_out."""
    model, _ = sft.load_model(tiny_llada, trust_remote_code=True)
    cfg, r = model.config, 4
    lora = sft.add_lora(model, r, 8)
    adapted = [n for n, m in lora.named_modules() if hasattr(m, "lora_A")]
    assert {n.split(".")[-1] for n in adapted} == LLADA_LORA_TARGETS
    assert not hasattr(lora.get_output_embeddings(), "lora_A")
    d, h = cfg.d_model, cfg.mlp_hidden_size  # per block: 4 of d -> d (q k v attn_out), ff_proj/up_proj d -> h, ff_out h -> d
    expected = cfg.n_layers * r * (4 * 2 * d + 3 * (d + h))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected
