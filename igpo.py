"""IGPO: Inpainting-Guided Policy Optimization for masked diffusion language models (Zhao et al. 2025)."""
# Run it:
#   python igpo.py                                  # embedded task (runs sft.py first if out/sft is missing)
#   python igpo.py --no_inpaint                     # plain GRPO baseline
#   python igpo.py --eta_low 0 --eta_high 0         # sample-matched control: extra samples, no hints
#   paper scale, one GPU: the README's command (tests/test_llada.py checks that the two agree)
#   python igpo.py --model out/sft_llada --trust_remote_code --dataset meta-math/MetaMathQA \
#       --metamath_official --question_col query --trace_col response --gen_length 256 --block_length 32 \
#       --diffusion_steps 128 --temperature 1.2 --num_generations 8 --batch_prompts 64 --grad_accum 64 \
#       --num_iterations 4 --lr 5e-7 --warmup_steps 50 --beta 0.01 --epsilon 0.2 --grad_clip 0.2 \
#       --chunk_min 5 --chunk_max 10 --gen_batch 64 --lora_r 128 --grad_ckpt --limit 0 --max_steps 500 \
#       --out_dir out/igpo_llada
#   Dream-v0-Instruct-7B: the same with --model out/sft_dream and --out_dir out/igpo_dream (README)
#
# What it does. GRPO learns only from groups whose samples disagree: if all G answers to a prompt are wrong,
# every advantage is zero (Eq. (4)) and the prompt is wasted. A masked diffusion LM can *inpaint*: generate
# with some answer positions fixed in advance. IGPO uses this on exactly those groups. It reveals fragments
# of the ground-truth reasoning trace at their own positions (Eq. (7)), lets the model fill in the rest, and
# swaps correct inpainted samples in for some wrong ones (Eq. (8)). The group now has a correct sample, so
# its advantages are not zero. Injected tokens were not sampled by the policy, so only the most uncertain of
# them, by the policy's own entropy, are trained on (Eq. (10)). The step, in order, is the loop in main().
#
# Eq. (k) refers to the equations of NOTES.md §2: the project's own numbering, not the paper's.
# Deviations from the paper and the official code, with reasons, are NOTES.md §3 ("item k" below). In this
# file: the loss is normalised per sequence as the paper writes it, with a token-level ratio (item 1); a
# completion is read up to its first end token (item 2); the answer is never hinted (item 3); one estimator
# pass per prompt (item 4); a binary reward (item 12); the LR schedule steps per batch of rollouts (item 13).
import argparse
import contextlib
import json
import math
import os
import re
import time

import torch
from tqdm import tqdm

import sft
from eval import (END_TOKENS, Sampler, answer_from_trace, check_sampler, completion_mask, evaluate, generate,
                  grade, load_task, logits_at, regime_check, speed_flags, write_json)
from sft import equal_length_batches, fail, load_model, load_rows, make_prompt


def get_args(argv=None):
    # allow_abbrev=False: a misspelled or removed flag is an error, not a prefix of another flag
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    # ---- model, how it is trained, its data (flags shared with sft.py and eval.py: sft.shared_flags)
    sft.shared_flags(p, model="out/sft", out_dir="out/igpo", training=True)
    # ---- data
    p.add_argument("--answer_col", default="", help="answer column; empty: read off the end of the trace")
    p.add_argument("--metamath_official", action="store_true", help="MetaMathQA rows as the official code")
    # ---- rollouts (the sampler: NOTES.md §4)
    p.add_argument("--batch_prompts", type=int, default=8, help="B: prompts per batch (paper: 64)")
    p.add_argument("--num_generations", type=int, default=8, help="G: completions per prompt (paper: 8)")
    p.add_argument("--gen_length", type=int, default=48, help="L: completion length (paper: 256)")
    p.add_argument("--block_length", type=int, default=8, help="semi-autoregressive block (paper: 32)")
    p.add_argument("--diffusion_steps", type=int, default=24, help="denoising steps (paper: 128)")
    p.add_argument("--temperature", type=float, default=1.2, help="rollout temperature (paper: 1.2)")
    p.add_argument("--gen_batch", type=int, default=0, help="sequences per sampler call; 0: all (memory)")
    p.add_argument("--early_exit", action=argparse.BooleanOptionalAction, default=True,
                   help="finished rows leave the sampler's batch (same tokens)")
    speed_flags(p)  # --confidence_threshold, --kv_cache: opt-in approximations (NOTES.md §3 item 25)
    # ---- inpainting (Eq. (7), (8), (10))
    p.add_argument("--no_inpaint", action="store_true", help="plain GRPO: leave all-wrong groups alone")
    p.add_argument("--eta_low", type=float, default=0.2, help="eta ~ U[eta_low, eta_high] (paper: 0.2)")
    p.add_argument("--eta_high", type=float, default=0.6, help="(paper: 0.6); 0/0: the resampling control")
    p.add_argument("--chunk_min", type=int, default=3, help="s_min: shortest hint chunk (paper code: 5)")
    p.add_argument("--chunk_max", type=int, default=6, help="s_max: longest hint chunk (paper code: 10)")
    p.add_argument("--max_replace_frac", type=float, default=0.5, help="lambda: replace <= floor(lambda G)")
    p.add_argument("--entropy_keep", type=float, default=0.2, help="tau: hint tokens kept by entropy (0.2)")
    # ---- policy optimisation (Eq. (6))
    p.add_argument("--num_iterations", type=int, default=2, help="mu: updates per batch (paper: 4)")
    p.add_argument("--epsilon", type=float, default=0.2, help="epsilon: ratio clip (paper: 0.2)")
    p.add_argument("--beta", type=float, default=0.01, help="beta: KL weight, k3 estimator (paper: 0.01)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (paper: 5e-7, LoRA on LLaDA-8B)")
    p.add_argument("--warmup_steps", type=int, default=5, help="linear warmup, in batches (paper: 50)")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (paper: 0.1)")
    p.add_argument("--grad_clip", type=float, default=0.2, help="gradient-norm clip (paper: 0.2)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per update (memory)")
    # ---- run
    p.add_argument("--max_steps", type=int, default=60, help="batches of rollouts, mu updates each")
    p.add_argument("--save_every", type=int, default=20, help="steps between checkpoints")
    p.add_argument("--limit", type=int, default=500, help="embedded test questions, before/after (0: none)")
    p.add_argument("--heldout_every", type=int, default=20, help="steps between held-out checks (0: none)")
    args = p.parse_args(argv)
    check_sampler(sampler_of(args))
    if args.num_generations < 2:
        fail(f"--num_generations must be at least 2 (got {args.num_generations}): with one sample per prompt "
             f"every advantage is 0 (Eq. (3)) and nothing is learned")
    if not (0 <= args.eta_low <= args.eta_high <= 1):
        fail(f"need 0 <= eta_low <= eta_high <= 1 (got {args.eta_low}, {args.eta_high})")
    if args.chunk_min < 1 or args.chunk_min > args.chunk_max:
        fail(f"need 1 <= chunk_min <= chunk_max (got {args.chunk_min}, {args.chunk_max})")
    if args.batch_prompts % args.grad_accum:
        fail(f"batch_prompts ({args.batch_prompts}) must be divisible by grad_accum ({args.grad_accum})")
    return args


def sampler_of(args):
    # The rollout sampler's settings (eval.Sampler) from the flags.
    return Sampler(args.gen_length, args.block_length, args.diffusion_steps, args.temperature,
                   args.early_exit, args.gen_batch, args.confidence_threshold, args.kv_cache)


# ----------------------------------------------------------------------------------------------------------
# Notation (NOTES.md §2)           code
#   q, o_i, G                      prompts (B token-id lists, unpadded), completions (B*G, L), G
#   B                              prompts per batch of rollouts (--batch_prompts)
#   r(o_i), A_i                    reward (B, G), adv (B*G,)
#   y*, eta, s_min/s_max           trace_ids, eta, chunk_min/chunk_max
#   lambda, tau, mu                max_replace_frac, entropy_keep, num_iterations
#   log pi_theta, pi_old, pi_ref   logp, logp_old, logp_ref (B*G, L) per token, from Eq. (5)
#   H                              entropy (B, L) under pi_old: one per prompt and position, as the
#                                  estimator's input is the same for a prompt's G samples (Eq. (5))
# Row b*G + i of every (B*G, ...) tensor is sample i of prompt b. W = the number of all-wrong groups.

# ---- data: (question, trace y*, gold answer) rows

# Where a trace starts stating its final answer. MetaMathQA states it twice: GSM_AnsAug ends "#### 72\nThe
# answer is: 72", MATH_AnsAug has "$\\boxed{5}$. The answer is: 5"; so the cut is at the FIRST marker.
ANSWER_START = re.compile(r"####|\\boxed|The answer is|<answer>")
# Room left for the answer: hints never reach into the last ANSWER_ROOM of the canvas (the official code keeps
# 30 of 256 positions free), so an inpainted sample of a trace as long as L can still state its \boxed{}
ANSWER_ROOM = 30 / 256
METAMATH_TYPES = ("GSM_AnsAug", "MATH_AnsAug")  # the official code's selection (--metamath_official)


def metamath_official(ds, qcol):
    # Row indices as the official code selects MetaMathQA: GSM_AnsAug and MATH_AnsAug, first row per query
    # (the other types rephrase or invert questions that these rows already hold).
    if "type" not in ds.column_names:
        fail("--metamath_official needs MetaMathQA's 'type' column")
    first = {}
    for i, (q, kind) in enumerate(zip(ds[qcol], ds["type"])):
        if kind in METAMATH_TYPES:
            first.setdefault(q, i)
    return sorted(first.values())


def load_rl_data(args):
    # [(question, trace, gold answer)]; rows whose answer cannot be found are dropped (counted).
    if args.dataset == "toy":  # enough distinct problems that a default run never repeats one
        # a random stream of its own ("rl-<seed>"), not SFT's ("<seed>"), as the paper's RL data (MetaMathQA)
        # differs from its SFT data; both draw from one pool, so ~1 in 5 prompts is an SFT problem by chance
        # (NOTES.md §3 item 18)
        n = max(1000, args.max_steps * args.batch_prompts)
        ds = sft.toy_dataset("train", n, seed=f"rl-{args.seed}")
        questions, traces, answers = ds["question"], ds["trace"], ds["answer"]
    else:
        cols = [args.question_col, args.trace_col] + ([args.answer_col] if args.answer_col else [])
        ds = load_rows(args.dataset, args.split, cols)
        if args.metamath_official:  # the official rows, hints prefixed with the format the prompt asks for
            # the map in memory: under torchrun every rank runs it, and none may write the others' cache file
            ds = ds.select(metamath_official(ds, args.question_col))
            ds = ds.map(lambda r: {args.trace_col: "<reasoning>\n" + r[args.trace_col]}, keep_in_memory=True)
        questions, traces = ds[args.question_col], ds[args.trace_col]
        answers = ds[args.answer_col] if args.answer_col else [answer_from_trace(t) for t in traces]
    data = [(q, t, str(a)) for q, t, a in zip(questions, traces, answers) if a is not None]
    if len(data) < len(questions):
        print(f"data: {len(questions) - len(data)} rows without a recognisable final answer dropped")
    if not data:
        fail(f"no usable (question, trace, answer) rows in {args.dataset}")
    return data


# ---- rollouts and inpainting: Eq. (7), (8)

def rollout(model, prompts, sampler, facts, gen, hints=None):
    # One completion (N, L) for each of the N prompts (token-id lists); hints (N, L) for inpainting. Rows go
    # through the sampler sampler.batch at a time (its logits, rows x block x vocab, bound its memory), and
    # only prompts of equal length together: no model ever sees a pad token.
    # How a masked diffusion LM samples (eval.generate, NOTES.md §4): the completion starts as L mask tokens
    # and is filled block by block, left to right. At each denoising step the model predicts every masked
    # position of the block at once, a token is drawn at each (temperature T), and only the most confident
    # draws are kept; the rest stay masked for a later step. Hint tokens are in place from the start and are
    # never masked again: that is all inpainting is.
    device = next(model.parameters()).device
    out = torch.empty(len(prompts), sampler.gen_length, dtype=torch.long, device=device)  # (N, L)
    for rows in equal_length_batches([len(q) for q in prompts], sampler.batch or len(prompts)):
        x = torch.tensor([prompts[i] for i in rows], device=device)  # (b, P_b)
        canvas = None if hints is None else hints[rows]
        out[rows] = generate(model, x, sampler, facts, canvas, gen)[:, x.shape[1]:]
    return out


def hintable_trace_ids(tokenizer, trace, gen_length):
    # Token ids of y* that may be revealed: those before the first final-answer statement, and none in the
    # canvas's last ceil(ANSWER_ROOM * L) positions (at L = 256: the last 30).
    m = ANSWER_START.search(trace)  # Eq. (7): the answer itself is never a hint (NOTES.md §3 item 3)
    room = math.ceil(ANSWER_ROOM * gen_length)
    ids = tokenizer(trace[:m.start()] if m else trace, add_special_tokens=False).input_ids
    return ids[:gen_length - room]


def trace_chunks(n, chunk_min, chunk_max, gen):
    # Eq. (7): consecutive chunks of U{s_min..s_max} tokens that cover n trace tokens, as (start, end) pairs;
    # the last one may be shorter.
    chunks, pos = [], 0
    while pos < n:
        size = int(torch.randint(chunk_min, chunk_max + 1, (1,), generator=gen))
        chunks.append((pos, min(pos + size, n)))
        pos += size
    return chunks


def make_hints(trace_ids, gen_length, eta, chunk_min, chunk_max, mask_id, gen):
    # Eq. (7): one hint canvas (L,): y*'s tokens in round(eta * #chunks) random chunks, the mask elsewhere.
    hints = torch.full((gen_length,), mask_id, dtype=torch.long)  # (L,)
    chunks = trace_chunks(len(trace_ids), chunk_min, chunk_max, gen)
    n_reveal = round(eta * len(chunks))  # Python rounds halves to even: a 1-chunk trace at eta 0.5 gets none
    for c in torch.randperm(len(chunks), generator=gen)[:n_reveal].tolist():
        a, b = chunks[c]
        hints[a:b] = torch.tensor(trace_ids[a:b])  # a revealed chunk sits at its own positions
    return hints


def hint_canvases(tokenizer, traces, args, mask_id, gen):
    # Eq. (7) for each trace: G canvases, each with its own eta ~ U[eta_low, eta_high]. -> (len(traces)*G, L).
    canvases = []
    for trace in traces:
        trace_ids = hintable_trace_ids(tokenizer, trace, args.gen_length)
        for _ in range(args.num_generations):
            eta = args.eta_low + (args.eta_high - args.eta_low) * float(torch.rand(1, generator=gen))
            hints = make_hints(trace_ids, args.gen_length, eta, args.chunk_min, args.chunk_max, mask_id, gen)
            canvases.append(hints)
    return torch.stack(canvases)


def replace_wrong(completions, reward, groups, inpainted, correct, hints, lam, mask_id):
    # Eq. (8): in each all-wrong group b of `groups`, K = min(#correct, floor(lambda G)) wrong samples are
    # replaced by correct inpainted ones. inpainted, hints (W*G, L) and correct (W, G): rows g*G .. g*G+G-1
    # belong to group groups[g]. Returns new (completions, reward, hint_mask (B*G, L), K per group).
    G = reward.shape[1]
    completions, reward = completions.clone(), reward.clone()
    hint_mask = torch.zeros(completions.shape, dtype=torch.bool, device=completions.device)  # (B*G, L)
    Ks = []
    for g, b in enumerate(groups):
        ok = correct[g].nonzero().flatten().tolist()
        # at most floor(lambda G): the group keeps wrong samples with negative advantage, and the hinted ones
        # cannot dominate its gradient (Eq. (11): the expected update peaks at a replaced fraction K/G of 1/2;
        # lambda only caps K/G)
        K = min(len(ok), math.floor(lam * G))
        for slot, j in enumerate(ok[:K]):  # all G originals are wrong: which K are replaced is immaterial
            # src: inpainted sample j of the g-th inpainted group; dst: slot 0, 1, .., K-1 of batch group b
            src, dst = g * G + j, b * G + slot
            completions[dst], reward[b, slot] = inpainted[src], 1.0
            # the injected tokens: candidates for Eq. (10). A hint after the row's end token was overwritten
            # by padding (early exit) and lies outside the loss mask anyway.
            hint_mask[dst] = hints[src] != mask_id
        Ks.append(K)
    return completions, reward, hint_mask, Ks


# ---- the estimator, the entropy filter and the loss: Eq. (3), (5), (6), (9), (10)

def advantages(reward):
    # Eq. (3): A_i = r(o_i) - mean_j r(o_j) within each group, with no division by the std (the paper's form):
    # an all-equal group, all wrong or all right, gets exactly 0. reward (B, G) -> adv (B*G,)
    return (reward - reward.mean(1, keepdim=True)).flatten()


def token_logps(model, prompts, completions, facts, with_entropy=False):
    # Eq. (5): log pi(o^k | q) ~= log f(o^k | q + M^L). A diffusion LM has no left-to-right factorisation to
    # score a sample with; the estimator masks the whole completion, runs the model once, and reads every
    # token's log-probability off the per-position distributions of that single pass (mean-field: position k
    # ignores the other tokens of o and the order in which the sampler committed them).
    # prompts: B token-id lists; completions (B*G, L) -> logp (B*G, L) [, entropy (B, L) for Eq. (10)].
    # The input does not depend on the sample, so the G completions of a prompt are read off one pass
    # (NOTES.md §3 item 4); prompts of equal length share it, unpadded (item 16).
    B, L = len(prompts), completions.shape[1]
    samples = completions.view(B, -1, L)  # (B, G, L)
    logps, entropies, order = [], [], []
    for rows in equal_length_batches([len(q) for q in prompts], B):
        P = len(prompts[rows[0]])
        x = torch.tensor([prompts[b] + [facts.mask_id] * L for b in rows], device=completions.device)
        logits = logits_at(model, x, P, P + L, facts.shifted).float()  # (b, L, V): the completion only
        lse = logits.logsumexp(-1, keepdim=True)  # (b, L, 1)
        # the G sampled tokens at each position, gathered from the one distribution there: index (b, L, G)
        index = samples[rows].transpose(1, 2)
        logps.append((logits.gather(-1, index) - lse).transpose(1, 2))  # log softmax at o^k, (b, G, L)
        if with_entropy:  # H = logsumexp - E_p[logit], (b, L)
            entropies.append(lse.squeeze(-1) - (logits.softmax(-1) * logits).sum(-1))
        order += rows
    back = torch.argsort(torch.tensor(order, device=completions.device))  # groups back into prompt order
    logp = torch.cat(logps)[back].reshape(-1, L)  # (B*G, L)
    return (logp, torch.cat(entropies)[back]) if with_entropy else logp


@contextlib.contextmanager
def trained_adapter_off(policy):
    # pi_ref under LoRA: the policy with the adapter being trained ("default") switched off. Adapters it was
    # loaded with (the SFT stage's) stay on, so pi_ref is the model RL started from, as without LoRA.
    frozen = [name for name in policy.peft_config if name != "default"]
    policy.base_model.set_adapter(frozen, inference_mode=True)
    try:
        yield
    finally:
        policy.base_model.set_adapter(frozen + ["default"])  # on again, and trainable
        if frozen:
            policy.set_requires_grad(frozen, False)


def estimate(model, prompts, completions, facts, micro, with_entropy=False):
    # Eq. (5) without gradients, one micro-batch of prompts at a time (bounds the logits' memory).
    with torch.no_grad():
        parts = [token_logps(model, prompts[p], completions[s], facts, with_entropy) for p, s in micro]
    return tuple(map(torch.cat, zip(*parts))) if with_entropy else torch.cat(parts)


def loss_tokens(completions, hint_mask, entropy, end_ids, tau):
    # Eq. (10): the (N, L) positions the loss reads. Every token up to and including the row's first end token
    # (NOTES.md §3 item 2), except the hint tokens the entropy filter drops; it ranks only the hints before
    # the end (a hint after it was overwritten by padding, and is not a token of the completion).
    valid = completion_mask(completions, end_ids)
    keep = entropy_filter(entropy, hint_mask & valid, tau)
    return valid & (~hint_mask | keep)


def entropy_filter(entropy, hint_mask, keep_frac):
    # Eq. (10): of each row's n hint positions keep the max(1, floor(tau n)) of highest entropy -> (N, L).
    n_hint = hint_mask.sum(1, keepdim=True)  # (N, 1)
    k = torch.clamp(torch.floor(keep_frac * n_hint), min=1)  # (N, 1)
    score = torch.where(hint_mask, entropy, float("-inf"))  # (N, L): non-hint positions rank last
    # argsort of argsort: the rank of each position in its row, 0 = highest entropy (a per-row top-k with k
    # varying by row, without a loop)
    rank = score.argsort(1, descending=True).argsort(1)  # (N, L)
    return hint_mask & (rank < k)


def grpo_loss(logp, logp_old, logp_ref, adv, loss_mask, epsilon, beta):
    # Eq. (6)/(9): clipped surrogate + beta * k3 KL per token. logp* (N, L); adv (N,) -> loss, kl, clip_frac.
    ratio = torch.exp(logp - logp_old)  # per token (the official code uses a sequence-level ratio: item 14)
    a = adv[:, None]  # (N, 1): one advantage per sample, shared by its tokens
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)  # (N, L)
    # k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi_theta; never
    # negative, and 0 exactly where the two agree, so beta = 0 and pi_theta = pi_ref both leave the surrogate
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1 if beta else torch.zeros_like(logp)
    per_token = -surrogate + beta * kl  # (N, L)
    # loss = (1/N) sum_i (1/|o_i|) sum_k loss_mask_ik * l_ik, with |o_i| = sum_k loss_mask_ik (item 1)
    m = loss_mask.float()
    n_tokens = m.sum(1).clamp(min=1)  # (N,): |o_i|
    loss = ((per_token * m).sum(1) / n_tokens).mean()
    kl_mean = ((kl * m).sum(1) / n_tokens).mean()
    clipped = ((ratio - 1).abs() > epsilon).float()  # diagnostic: tokens where the clip is active
    return loss, kl_mean.detach(), ((clipped * m).sum() / m.sum().clamp(min=1)).detach()


LOGGED = ["step", "loss", "reward", "all_wrong", "all_wrong_after", "kl", "skipped", "seconds"]  # NOTES §5
HELDOUT_QUESTIONS = 100  # test problems of the held-out curve (--heldout_every), G samples each


def start_run(args):
    # Everything before the data: the process group (torchrun), the RNG streams, the default pipeline's SFT
    # when out/sft is missing, and the run folder (resumed, or fresh). Returns (rank, world, device, gen,
    # hint_gen, saved state or None).
    rank, world, device = sft.init_distributed(args.device)  # world > 1 under torchrun
    # --batch_prompts and --grad_accum count the whole step: each rank rolls out and trains an equal share
    sft.split_over_ranks(args.grad_accum, world, "--grad_accum")  # (so batch_prompts splits evenly too)
    # rollouts draw from `gen`, hints (eta, chunks, which ones) from `hint_gen`
    torch.manual_seed(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed + 1000 * rank)
    hint_gen = torch.Generator().manual_seed(args.seed + 1000 * rank + 1)
    if args.model == "out/sft" and not os.path.isdir("out/sft"):  # the default pipeline is SFT, then RL
        print("out/sft not found: running `python sft.py` (SFT with default flags) first, then RL from it")
        sft.main([], regime_check=regime_check)  # sft.py's stop rule measures with eval.py's sampler
    if not os.path.isdir(args.model) and os.path.exists(args.model):
        fail(f"--model {args.model} is not a checkpoint folder")
    state = sft.open_run(args)  # None unless --resume finds a checkpoint
    example = os.path.join(args.out_dir, "example.json")  # a dead run's (killed before its first save)
    if rank == 0 and not state and os.path.exists(example):
        os.remove(example)
    return rank, world, device, gen, hint_gen, state


def reference_model(args, policy, device):
    # pi_ref of the KL term (used when beta > 0), with the context its passes run in: with LoRA, the policy
    # with its trained adapter switched off; without, the start model loaded again (a resumed policy holds
    # trained weights), frozen.
    ref_model, reference = policy, lambda: trained_adapter_off(policy)
    if args.beta and not args.lora_r:
        ref_model = load_model(args.model, args.trust_remote_code, device, torch.float32, merge=True)[0]
        ref_model, reference = ref_model.eval().requires_grad_(False), contextlib.nullcontext
    return ref_model, reference


def measure_start(policy, tokenizer, facts, args, amp):
    # Where a fresh run on the embedded task starts: greedy test accuracy (eval_before.json; None without
    # --limit) and the held-out curve's first point (step 0 in metrics.jsonl).
    acc = test_accuracy(policy, tokenizer, facts, args, amp, "before") if args.limit else None
    if args.heldout_every:
        with amp():
            first = heldout_accuracy(policy, tokenizer, facts, sampler_of(args), args.num_generations)
        if sft.rank_and_world()[0] == 0:
            sft.log_metrics(args.out_dir, {"step": 0, "heldout": round(first, 5)})
    return acc


def main(argv=None):
    args = get_args(argv)
    # ---- the process group, RNG streams, the automatic SFT and the run folder (resume or a fresh start)
    rank, world, device, gen, hint_gen, state = start_run(args)

    # ---- data: (question, trace, answer) rows; the task picks the grader: numbers for the embedded task,
    # LaTeX-aware (math-verify) for real data
    toy = args.dataset == "toy"
    task = "toy" if toy else "math500"
    data = load_rl_data(args)
    G, B = args.num_generations, args.batch_prompts // world  # B: this rank's share of the step's prompts
    sampler = sampler_of(args)

    # ---- model: the policy pi_theta (gradient passes go through `model`, the DDP wrapper under torchrun,
    # no-grad passes through `policy`), and the reference pi_ref of the KL term
    policy, model, params, tokenizer, facts, amp_dtype = sft.setup_model(args, device, state)
    amp = lambda: sft.autocast(device, amp_dtype)  # every forward pass: rollouts, estimator, evaluation
    ref_model, reference = reference_model(args, policy, device)

    # ---- optimizer: AdamW, linear warmup; one schedule step per batch of rollouts (NOTES.md §3 item 13)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    step, skipped = sft.restore(state, args.out_dir, opt, sched, [gen, hint_gen]) if state else (0, 0)
    bad = 0  # non-finite updates in a row

    acc_before = measure_start(policy, tokenizer, facts, args, amp) if toy and not state else None
    heldout = toy and args.heldout_every  # the held-out curve: every --heldout_every steps, and at step 0

    bar = tqdm(total=args.max_steps, initial=step, desc="igpo", disable=None if rank == 0 else True)
    while step < args.max_steps:
        t0 = time.time()
        # [(question, trace y*, gold answer)] * B: the step's --batch_prompts prompts, of which each rank
        # under torchrun rolls out its own equal share (B = batch_prompts / world; DDP averages the gradients)
        batch = sft.batch_at(data, args.batch_prompts, step, args.seed)[rank * B:(rank + 1) * B]
        questions, traces, answers = zip(*batch)
        prompts = [tokenizer(make_prompt(tokenizer, q, toy), add_special_tokens=False).input_ids
                   for q in questions]  # B token-id lists, unpadded
        rep = lambda rows: [r for r in rows for _ in range(G)]  # B -> B*G: row b*G + i, sample i of prompt b
        mb = args.batch_prompts // args.grad_accum  # prompts per micro-batch: (prompt rows, sample rows)
        micro = [(slice(a, a + mb), slice(a * G, (a + mb) * G)) for a in range(0, B, mb)]

        # ================================ the IGPO step (NOTES.md §5) ================================
        # 1. rollout: G samples per prompt (the sampler takes prompts of one length, --gen_batch rows a call)
        policy.eval()
        with amp():
            completions = rollout(policy, rep(prompts), sampler, facts, gen)  # (B*G, L)
        # 2. grade: binary reward r(o_i), read up to the first end token (NOTES.md §3 item 2)
        texts = tokenizer.batch_decode(completions)
        reward = [float(grade(text, answers[j // G], task)) for j, text in enumerate(texts)]
        reward = torch.tensor(reward).view(B, G)
        own_reward = reward.mean().item()  # the policy's own success rate, before any rescue
        # 3. Eq. (4): all-wrong groups have zero advantage everywhere; these are the ones inpainting rescues
        all_wrong = (reward.sum(1) == 0).nonzero().flatten().tolist()
        hint_mask = torch.zeros_like(completions, dtype=torch.bool)  # (B*G, L): injected tokens, none yet
        rescue = {"groups": all_wrong, "Ks": []}  # what inpainting did (bookkeeping and the worked example)
        if all_wrong and not args.no_inpaint:
            # 4. Eq. (7): G hint canvases per all-wrong group, from the group's own trace y*
            hints = hint_canvases(tokenizer, [traces[b] for b in all_wrong], args, facts.mask_id, hint_gen)
            hints = hints.to(device)  # (W*G, L)
            # 5. inpaint: the same sampler, started from the canvases (a hint is never remasked), then graded
            with amp():
                inpainted = rollout(policy, rep([prompts[b] for b in all_wrong]), sampler, facts, gen, hints)
            inpainted_texts = tokenizer.batch_decode(inpainted)
            correct = [grade(t, answers[all_wrong[j // G]], task) for j, t in enumerate(inpainted_texts)]
            correct = torch.tensor(correct).view(len(all_wrong), G)  # (W, G)
            # 6. Eq. (8): K = min(#correct, floor(lambda G)) correct inpainted samples replace wrong ones
            lam = args.max_replace_frac
            completions, reward, hint_mask, Ks = replace_wrong(completions, reward, all_wrong, inpainted,
                                                               correct, hints, lam, facts.mask_id)
            rescue.update(hints=hints, inpainted=inpainted, correct=correct, Ks=Ks)
        # 7. Eq. (3): group-relative advantages on the new groups
        adv = advantages(reward).to(device)  # (B*G,)
        # 8. Eq. (5): pi_old log-probs and entropies H (B, L); pi_ref log-probs for the KL term of Eq. (6)
        with amp():
            logp_old, entropy = estimate(policy, prompts, completions, facts, micro, with_entropy=True)
            logp_ref = logp_old  # unused when beta = 0
            if args.beta:
                with reference():
                    logp_ref = estimate(ref_model, prompts, completions, facts, micro)
        # 9. Eq. (10): the loss reads every self-generated token up to the end token; of the hint tokens, only
        # the top tau by entropy under pi_old
        H = entropy.repeat_interleave(G, 0)  # (B*G, L): each sample reads its prompt's entropies
        loss_mask = loss_tokens(completions, hint_mask, H, facts.end_ids, args.entropy_keep)  # (B*G, L)
        # 10. mu AdamW updates on Eq. (6)/(9)
        policy.train()
        for _ in range(args.num_iterations):
            stats = torch.zeros(3)  # loss, kl, clip_frac of this update (the last update's are logged)
            for p, s in micro:  # p: the micro-batch's prompt rows, s: its sample rows
                # as logp_old was computed: the first update's ratio is exactly 1, unless the model has
                # dropout (LoRA's 0.05: logp_old came in eval mode, this in train mode; NOTES §3 item 15)
                with amp():
                    logp = token_logps(model, prompts[p], completions[s], facts)  # (mb*G, L)
                loss, kl, clip_frac = grpo_loss(logp, logp_old[s], logp_ref[s], adv[s], loss_mask[s],
                                                args.epsilon, args.beta)
                # each micro-batch's loss / this rank's count: the gradients add up to the rank's batch, and
                # DDP's average over ranks makes it the whole batch's
                (loss / len(micro)).backward()
                stats += torch.tensor([loss.item(), kl.item(), clip_frac.item()]) / len(micro)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # the norm before clipping
            finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(stats).all())
            if finite:  # a non-finite update is skipped and counted; too many in a row stop the run
                opt.step()
            opt.zero_grad(set_to_none=True)
            skipped, bad = skipped + (not finite), sft.count_bad(bad, finite)
        sched.step()
        step += 1
        # ============================ everything below is bookkeeping ============================

        Ks = rescue["Ks"]
        rescued = [b for b, K in zip(all_wrong, Ks) if K]
        means = {"reward": own_reward, "all_wrong": len(all_wrong) / B,
                 "all_wrong_after": (len(all_wrong) - len(rescued)) / B,
                 "hint_frac": ((hint_mask & loss_mask).sum() / loss_mask.sum().clamp(min=1)).item(),
                 "entropy": entropy.mean().item(), "loss": stats[0].item(), "kl": stats[1].item(),
                 "clip_frac": stats[2].item(), "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0]}
        counts = {"inpainted_groups": len(Ks), "replaced": sum(Ks)}
        means, counts = mean_over_ranks(means, counts, world, device)
        row = {"step": step, **{k: round(v, 5) for k, v in means.items()}, **counts, "skipped": skipped,
               "seconds": round(time.time() - t0, 2)}
        if heldout and step % args.heldout_every == 0:
            with amp():
                row["heldout"] = round(heldout_accuracy(policy, tokenizer, facts, sampler, G), 5)
        if rank == 0:
            sft.log_metrics(args.out_dir, row)
            bar.update(1)
            bar.write(sft.log_line(row, LOGGED + ["heldout"] * ("heldout" in row)))
            if rescued and not os.path.exists(os.path.join(args.out_dir, "example.json")):  # the first rescue
                rescue.update(reward=reward, adv=adv, completions=completions, hint_mask=hint_mask,
                              loss_mask=loss_mask)
                save_example(args.out_dir, tokenizer, step, batch, rescue)
        if step % args.save_every == 0 or step == args.max_steps:
            sft.checkpoint(args, policy, tokenizer, opt, sched, [gen, hint_gen], step, skipped)
    bar.close()

    if args.limit and toy:
        acc_after = test_accuracy(policy, tokenizer, facts, args, amp, "after")
        if rank == 0:
            finish(args.out_dir, acc_before, acc_after, args.limit)


# ----------------------------------------------------------------------------------------------------------
# Everything in this section is reporting: the worked example, the run summary, the curves.

def heldout_accuracy(policy, tokenizer, facts, sampler, G):
    # The policy's accuracy at the rollout temperature on a fixed held-out set (the first HELDOUT_QUESTIONS
    # test problems x G samples, the same noise at every check). A step's reward depends on which prompts the
    # step drew; this does not, so it shows whether the policy itself gets better (NOTES.md §10). Like
    # test_accuracy it samples with the exact schedule: runs with and without the levers (item 25) compare.
    gen = torch.Generator(next(policy.parameters()).device).manual_seed(0)
    exact = sampler._replace(confidence_threshold=0.0, kv_cache=False)
    items = load_task("toy", limit=HELDOUT_QUESTIONS)
    return evaluate(policy, tokenizer, facts, items, "toy", exact, G, gen)[1]


def save_example(out_dir, tokenizer, step, batch, rescue):
    # The first rescued group of the run, in full: example.json (printed at the end, NOTES.md §10's example).
    g = next(g for g, K in enumerate(rescue["Ks"]) if K)  # the first rescued of the inpainted groups
    b, G = rescue["groups"][g], rescue["reward"].shape[1]
    rows, own = range(b * G, (b + 1) * G), slice(g * G, (g + 1) * G)
    hint_mask, kept = rescue["hint_mask"], rescue["hint_mask"] & rescue["loss_mask"]
    example = {"step": step, "question": batch[b][0], "trace": batch[b][1], "answer": batch[b][2], "group": b,
               "hint_canvases": [tokenizer.decode(c).replace(sft.MASK, "_") for c in rescue["hints"][own]],
               "inpainted": tokenizer.batch_decode(rescue["inpainted"][own]),
               "inpainted_correct": rescue["correct"][g].tolist(), "replaced": rescue["Ks"][g],
               "new_group": tokenizer.batch_decode(rescue["completions"][b * G:(b + 1) * G]),
               "new_rewards": rescue["reward"][b].tolist(),
               "advantages": [round(rescue["adv"][i].item(), 4) for i in rows],
               "hint_positions": [hint_mask[i].nonzero().flatten().tolist() for i in rows],
               "kept_hint_positions": [kept[i].nonzero().flatten().tolist() for i in rows]}
    with open(os.path.join(out_dir, "example.json"), "w") as f:
        json.dump(example, f, indent=1)


def print_example(out_dir):
    # One rescue, as a student should see it first: the question, a hint canvas ('_' = masked), what the
    # model wrote into it, and the group's rewards and advantages before and after the swap.
    if not os.path.exists(os.path.join(out_dir, "example.json")):
        return print("no all-wrong group was rescued in this run")
    ex = json.load(open(os.path.join(out_dir, "example.json")))
    i = ex["inpainted_correct"].index(True)
    cut = lambda text: END_TOKENS.split(text, 1)[0].replace("\n", "⏎")  # up to the first end token
    print(f"a rescued group (step {ex['step']}): {ex['question']}\n"
          f"  all {len(ex['new_rewards'])} samples wrong: rewards all 0, so every advantage is 0 (Eq. (4))\n"
          f"  hint canvas: {cut(ex['hint_canvases'][i])}\n  inpainted:   {cut(ex['inpainted'][i])}  (right: "
          f"the reward reads only the final \\boxed{{}})\n"
          f"  {ex['replaced']} right inpainted samples swapped in: rewards {ex['new_rewards']}, "
          f"advantages {ex['advantages']}\n  entropy filter (Eq. (10)): the loss of the first keeps "
          f"{len(ex['kept_hint_positions'][0])} of its {len(ex['hint_positions'][0])} hint tokens")


def summarize(out_dir):
    # Whole-run means from metrics.jsonl: the numbers the results tables of NOTES.md §10 report.
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if l.strip()]
    curve = [r["heldout"] for r in rows if "heldout" in r]
    rows = [r for r in rows if "reward" in r]  # the step rows (step 0 holds only the first held-out check)
    mean = lambda key, rs=rows: round(sum(r[key] for r in rs) / max(1, len(rs)), 4)
    quarters = [rows[len(rows) * k // 4:len(rows) * (k + 1) // 4] for k in range(4)]
    return {"steps": len(rows), "all_wrong": mean("all_wrong"), "all_wrong_after": mean("all_wrong_after"),
            "replaced_per_step": mean("replaced"), "reward_by_quarter": [mean("reward", q) for q in quarters],
            "heldout": curve, "max_kl": round(max(r["kl"] for r in rows), 5),
            "train_seconds": round(sum(r["seconds"] for r in rows), 1)}


def plot_run(out_dir, acc_before, acc_after):
    # curves.png in out_dir: per step (thin: each step, thick: running mean over 5) the all-wrong fractions
    # and the reward of the step's own samples, and the held-out accuracy at the rollout temperature; the
    # title gives test accuracy (greedy) before -> after.
    import matplotlib
    matplotlib.use("Agg")  # write a file; no display needed
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if l.strip()]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in [("reward", "reward of the step's own samples"), ("all_wrong", "all-wrong groups"),
                       ("all_wrong_after", "all-wrong after inpainting (what the gradient sees)")]:
        steps, y = zip(*[(r["step"], r[key]) for r in rows if key in r])
        smooth = [sum(y[max(0, i - 4):i + 1]) / len(y[max(0, i - 4):i + 1]) for i in range(len(y))]
        line, = ax.plot(steps, y, lw=0.6, alpha=0.5)
        ax.plot(steps, smooth, lw=2, color=line.get_color(), label=label)
    held = [(r["step"], r["heldout"]) for r in rows if "heldout" in r]
    if held:
        label = f"accuracy at the rollout temperature, {HELDOUT_QUESTIONS} held-out questions x G"
        ax.plot(*zip(*held), "o-", color="black", lw=2, label=label)
    title = f"test accuracy (greedy) {100 * acc_before:.1f}% -> {100 * acc_after:.1f}%" if acc_before else ""
    ax.set(xlabel="RL step", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)


def test_accuracy(policy, tokenizer, facts, args, amp, when):
    # Greedy accuracy on the first --limit embedded test questions, saved per question in eval_<when>.json so
    # that runs can be compared paired (eval.py --compare A B); the exact schedule, whatever the rollouts use
    exact = sampler_of(args)._replace(temperature=0.0, batch=64, confidence_threshold=0.0, kv_cache=False)
    with amp():
        records, acc = evaluate(policy, tokenizer, facts, load_task("toy", limit=args.limit), "toy", exact)
    print(f"accuracy {when} RL: {100 * acc:.1f}% on {len(records)} test questions")
    if sft.rank_and_world()[0] == 0:
        write_json(os.path.join(args.out_dir, f"eval_{when}.json"), {"generations": records})
    return acc


def finish(out_dir, acc_before, acc_after, n):
    # The run's summary (eval.json, printed), its curves, and one rescued group.
    summary = {"accuracy_before": acc_before, "accuracy_after": acc_after, "n": n, **summarize(out_dir)}
    write_json(os.path.join(out_dir, "eval.json"), summary)
    print("run summary: " + json.dumps(summary))
    plot_run(out_dir, acc_before, acc_after)
    print(f"curves: {os.path.join(out_dir, 'curves.png')}")
    print_example(out_dir)


def mean_over_ranks(means, counts, world, device):
    # Under torchrun, means averaged and counts summed over ranks; as they are in one process.
    if world == 1:
        return means, counts
    vals = torch.tensor(list(means.values()) + list(counts.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(vals)
    n = len(means)
    return dict(zip(means, (vals[:n] / world).tolist())), dict(zip(counts, vals[n:].long().tolist()))


if __name__ == "__main__":
    main()
