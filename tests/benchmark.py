"""
Speed and memory of the hot paths, measured (not asserted). Not collected by pytest.

    python tests/benchmark.py            # prints a table and writes out/benchmark.json
    python tests/benchmark.py --quick    # smaller shapes, for a smoke test
    python tests/benchmark.py --ckpt out/sft_bench   # early exit measured on another SFT checkpoint

What it measures (NOTES.md "Performance" holds the numbers):
- sampler: seconds per generated token at batch 64 with the embedded model, and its overhead = total time
  / time spent inside the model's forward calls of the same run (also against 32 x one separately timed
  forward pass, which is noisier on a shared CPU);
- the same sampler against a reference written the way LLaDA's generate() is (float64 softmax over every
  position and the whole vocabulary, a Python loop over rows for top-k), with a 126,464-token vocabulary:
  time, peak memory of one sampling step, and whether greedy outputs are identical;
- the estimator pass (log-probs + entropies, Eq. (5)/(10)) against a naive version (log_softmax of the
  logits repeated for every sample): time and peak memory;
- one IGPO step on the embedded model, split into rollouts, inpainting rollouts, grading, old/ref passes
  and updates;
- early exit (eval.generate's end_ids, --early_exit): one IGPO step on the SFT checkpoint --ckpt (default
  out/sft) with it off and on: row-forwards per rollout, rollout seconds, and whether everything the step
  reads is identical; then the sampler alone at the paper's shape (L = 256, block 32, 128 steps) with a model
  whose answers end at a known position (mid-answer, and where LLaDA-8B-Instruct's GSM8K answers end);
- the sampler's two levers, --confidence_threshold and --kv_cache: one IGPO step on --ckpt with each threshold
  (forwards and positions fed per rollout, seconds), then the sampler at the paper's rollout shape on a tiny
  random LLaDA (threshold only: its hub code refuses a cache) and Dream (both, and together);
- optionally (--pipeline) the wall time of the default `python igpo.py` pipeline from scratch.
Peak memory on CPU: torch has no CPU high-water mark, so peak_bytes() replays the allocation and free events
that torch's profiler records (profile_memory=True) and takes the maximum of live tensor bytes.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import igpo  # noqa: E402
import sft  # noqa: E402

LLADA_VOCAB = 126464
LLADA_GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "d1_generations",
                           "gsm8k_instruct_256_128_0_generations.json")  # real generations (vendored)


def peak_bytes(fn):
    """Run fn() and return (result, peak bytes of torch CPU tensors allocated during it and alive at once)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # Replay the allocator's own stream, one event per allocation (+bytes) or free (-bytes), in time order.
    # Per-operation figures do not give the peak: cpu_memory_usage counts an allocation once per enclosing
    # operation (a linear layer's output three times), self_cpu_memory_usage nets what an operation frees
    # before it returns (logsumexp over an 8 MB tensor: 0.008 MB, hiding its 8 MB temporary).
    live, peak = 0, 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


def timed(fn, repeat=3):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - t) / repeat


def reference_generate(model, prompt, gen_length, block_length, steps, mask_id):
    """LLaDA's generate() at temperature 0 as it is usually written (full-sequence float64 softmax, per-row
    top-k loop), for a batch of unpadded prompts of equal length."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    nblocks = gen_length // block_length
    per_block = steps // nblocks
    for nb in range(nblocks):
        end = P + (nb + 1) * block_length
        block_mask = x[:, P + nb * block_length:end] == mask_id
        sched = ev.num_transfer_tokens(block_mask, per_block)
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model(x).logits
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            x0 = torch.where(mask_index, x0, x)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, sel = torch.topk(confidence[j], k=int(sched[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x


def naive_token_logps(model, prompt_ids, completions, G, mask_id):
    """Eq. (5) the straightforward way: every sample gets its own forward pass and full log_softmax."""
    B, P = prompt_ids.shape
    L = completions.shape[1]
    x = torch.cat([prompt_ids, torch.full((B, L), mask_id, dtype=torch.long)], 1).repeat_interleave(G, 0)
    logprobs = F.log_softmax(model(x).logits[:, P:].float(), -1)  # (B*G, L, V)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, completions.unsqueeze(-1)).squeeze(-1), entropy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--pipeline", action="store_true", help="also time the default `python igpo.py` from scratch")
    ap.add_argument("--out", default="out/benchmark.json")
    ap.add_argument("--ckpt", default="out/sft", help="SFT checkpoint for the early-exit comparison")
    ap.add_argument("--levers_only", action="store_true", help="only --confidence_threshold and --kv_cache")
    args = ap.parse_args()
    if args.levers_only:
        return report(args.out, speed_levers(args.ckpt, args.quick))
    torch.manual_seed(0)
    tok = sft.build_toy_tokenizer()
    mask_id = tok.mask_token_id
    facts = sft.model_facts(sft.build_toy_model(tok).config, tok)
    wide_facts = facts._replace(n_tokens=LLADA_VOCAB)  # the wide model's every id is a token
    greedy = lambda L_, Lb_, steps_: ev.Sampler(L_, Lb_, steps_, 0.0, early_exit=False)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    B = 8 if args.quick else 64
    L, Lb, steps = 64, 16, 32
    prompt = torch.tensor([tok(sft.make_prompt(tok, "Ann has 23 coins. Buys 17. Loses 9. How many coins now?", True),
                               add_special_tokens=False).input_ids] * B)

    # ---- sampler on the embedded model, batch B
    model = sft.build_toy_model(tok).eval()
    with torch.no_grad():
        x = torch.cat([prompt, torch.full((B, L), mask_id)], 1)
        _, t_fwd = timed(lambda: model(x).logits, repeat=5)
        _, t_gen = timed(lambda: ev.generate(model, prompt, greedy(L, Lb, steps), facts), repeat=2)
    # overhead measured inside one run: total sampler time / time spent in the model's own forward calls
    fwd_time, real_forward = [0.0], model.forward

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = real_forward(*a, **k)
        fwd_time[0] += time.perf_counter() - t
        return out

    model.forward = timed_forward
    with torch.no_grad():
        t = time.perf_counter()
        ev.generate(model, prompt, greedy(L, Lb, steps), facts)
        t_run = time.perf_counter() - t
    model.forward = real_forward
    res["sampler_seconds_per_token"] = t_gen / (B * L)
    res["sampler_forward_seconds"] = t_fwd
    res["sampler_overhead"] = t_run / fwd_time[0]
    res["sampler_overhead_vs_separate_forward"] = t_gen / (steps * t_fwd)

    # ---- sampler vs the reference at LLaDA's vocabulary
    Bw = 2 if args.quick else 8
    wide = wide_model(tok).eval()
    with torch.no_grad():
        for p in wide.parameters():
            if p.dim() > 1:
                p.mul_(20.0)  # peaked predictions, so greedy choices are well separated
        pw = prompt[:Bw]
        ours, t_ours = timed(lambda: ev.generate(wide, pw, greedy(L, Lb, steps), wide_facts), repeat=1)
        ref, t_ref = timed(lambda: reference_generate(wide, pw, L, Lb, steps, mask_id), repeat=1)
        res["greedy_identical"] = bool(torch.equal(ours, ref))
        res["sampler_speedup_vs_reference"] = t_ref / t_ours
        # peak memory of one sampling step (one block, one step)
        _, m_ours = peak_bytes(lambda: ev.generate(wide, pw, greedy(Lb, Lb, 1), wide_facts))
        _, m_ref = peak_bytes(lambda: reference_generate(wide, pw, Lb, Lb, 1, mask_id))
        # the same step at temperature 1.2 (rollouts): the float64 Gumbel noise is drawn a chunk at a time
        sampled = ev.Sampler(Lb, Lb, 1, 1.2, early_exit=False)
        g = torch.Generator().manual_seed(0)
        _, m_ours_t = peak_bytes(lambda: ev.generate(wide, pw, sampled, wide_facts, generator=g))
        logits_mb = Bw * Lb * LLADA_VOCAB * 4 / 2**20
        xw = torch.cat([pw, torch.full((Bw, Lb), mask_id)], 1)
        _, m_fwd = peak_bytes(lambda: wide(xw).logits)
    res["sampler_step_peak_mb"] = m_ours / 2**20
    res["reference_step_peak_mb"] = m_ref / 2**20
    res["forward_peak_mb_wide"] = m_fwd / 2**20
    res["sampler_memory_ratio_vs_reference"] = m_ref / m_ours
    res["sampler_step_peak_mb_temperature"] = m_ours_t / 2**20
    res["sampler_step_block_logits_mb"] = logits_mb

    # ---- estimator pass (log-probs + entropies) vs naive, wide vocabulary, G samples per prompt
    G = 8
    Bp = 1 if args.quick else 2
    completions = torch.randint(10, 100, (Bp * G, L))
    plist = prompt[:Bp].tolist()
    with torch.no_grad():
        (lp, ent), m_est = peak_bytes(lambda: igpo.token_logps(wide, plist, completions, wide_facts, True))
        (lp_n, ent_n), m_naive = peak_bytes(lambda: naive_token_logps(wide, prompt[:Bp], completions, G, mask_id))
        _, t_est = timed(lambda: igpo.token_logps(wide, plist, completions, wide_facts, True), repeat=1)
        _, t_naive = timed(lambda: naive_token_logps(wide, prompt[:Bp], completions, G, mask_id), repeat=1)
    res["estimator_same_values"] = bool(torch.allclose(lp, lp_n, atol=1e-4)
                                        and torch.allclose(ent.repeat_interleave(G, 0), ent_n, atol=1e-3))
    res["estimator_peak_mb"], res["estimator_naive_peak_mb"] = m_est / 2**20, m_naive / 2**20
    res["estimator_memory_ratio_vs_naive"] = m_naive / m_est
    res["estimator_speedup_vs_naive"] = t_naive / t_est

    # ---- one IGPO step on the embedded model, by phase
    res["igpo_step_phases"] = igpo_step_phases(tok, quick=args.quick)

    # ---- early exit: one IGPO step's rollouts on the SFT checkpoint, then the paper's rollout shape
    if os.path.isdir(args.ckpt):
        ee = res["early_exit_igpo_step"] = early_exit_igpo_step(args.ckpt, args.quick)
        res["early_exit_forward_ratio"], res["early_exit_identical"] = ee["forward_ratio"], ee["identical"]
    else:
        print(f"no checkpoint at {args.ckpt}: early exit on the embedded task not measured (run sft.py or pass --ckpt)")
    n = 8 if args.quick else 64
    res["early_exit_paper_shape_half"] = early_exit_paper_shape([128] * n)
    if os.path.exists(LLADA_GSM8K):
        res["early_exit_paper_shape_llada_gsm8k"] = early_exit_paper_shape(llada_gsm8k_ends(n))

    # ---- the sampler's two levers (NOTES.md §3 item 25)
    res.update(speed_levers(args.ckpt, args.quick))

    # ---- the default pipeline, from scratch
    if args.pipeline:
        t = time.time()
        subprocess.run([sys.executable, "igpo.py", "--out_dir", "out/bench_igpo", "--overwrite"], check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        res["pipeline_seconds"] = time.time() - t
    else:
        res["pipeline_seconds"] = None

    report(args.out, res)


def report(path, res):
    """Write res to path (JSON) and print it, one line per entry."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in res.items():
        print(f"{k:38s} {v if not isinstance(v, float) else round(v, 4)}")


def wide_model(tok):
    """The embedded architecture with LLaDA's 126,464-row vocabulary (the tokenizer's ids come first)."""
    from transformers import ModernBertForMaskedLM
    config = sft.build_toy_model(tok).config
    config.vocab_size = LLADA_VOCAB
    return ModernBertForMaskedLM(config)


def count_rows(model):
    """A list whose [0] counts the rows of every forward call of model (a sequence forward pass each) and [1]
    the positions they feed (with --kv_cache, only those after the cached prefix)."""
    work = [0, 0]

    def hook(module, a):
        work[0] += a[0].shape[0]
        work[1] += a[0].numel()

    model.register_forward_pre_hook(hook)
    return work


def igpo_step(model, tok, args, batch):
    """One IGPO step as igpo.py runs it, timed by phase. Returns (phase seconds, what the step reads: tokens,
    rewards, hint and loss masks, the loss, the rollout generator's state; and the rollouts' work: row-forwards
    and positions fed per rollout, the step's own reward, all-wrong groups before and after the rescue)."""
    mask_id, G, rows = tok.mask_token_id, args.num_generations, count_rows(model)
    facts = sft.model_facts(model.config, tok)
    end_ids = torch.tensor(facts.end_ids)
    sampler = igpo.sampler_of(args)
    prompts = [tok(sft.make_prompt(tok, q, True), add_special_tokens=False).input_ids for q, _, _ in batch]
    rep = lambda xs: [x for x in xs for _ in range(G)]
    gen, hint_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    times = {}
    t = time.perf_counter()
    model.eval()
    comp = igpo.rollout(model, rep(prompts), sampler, facts, gen)
    times["rollouts"] = time.perf_counter() - t
    t = time.perf_counter()
    texts = tok.batch_decode(comp)
    reward = torch.tensor([float(ev.grade(texts[j], batch[j // G][2], "toy")) for j in range(len(texts))]).view(-1, G)
    times["grading"] = time.perf_counter() - t
    t = time.perf_counter()
    all_wrong = (reward.sum(1) == 0).nonzero().flatten().tolist()
    own_reward = reward.mean().item()
    hint_mask = torch.zeros_like(comp, dtype=torch.bool)
    if all_wrong:
        hints = igpo.hint_canvases(tok, [batch[b][1] for b in all_wrong], args, mask_id, hint_gen)
        inpainted = igpo.rollout(model, rep([prompts[b] for b in all_wrong]), sampler, facts, gen, hints)
        inp_texts = tok.batch_decode(inpainted)
        correct = torch.tensor([ev.grade(t, batch[all_wrong[j // G]][2], "toy") for j, t in enumerate(inp_texts)],
                               dtype=torch.bool).view(len(all_wrong), G)
        comp, reward, hint_mask, _ = igpo.replace_wrong(comp, reward, all_wrong, inpainted, correct, hints,
                                                        args.max_replace_frac, mask_id)
    times["inpainting_rollouts_and_grading"] = time.perf_counter() - t
    n_rollouts = len(comp) + G * len(all_wrong)
    work = {"forwards_per_rollout": rows[0] / n_rollouts, "fed_per_rollout": rows[1] / n_rollouts,
            "reward": own_reward, "all_wrong": len(all_wrong) / len(batch),
            "all_wrong_after": (reward.sum(1) == 0).float().mean().item()}
    t = time.perf_counter()
    with torch.no_grad():
        logp_old, ent = igpo.token_logps(model, prompts, comp, facts, with_entropy=True)
        logp_ref = igpo.token_logps(model, prompts, comp, facts)
    times["old_and_ref_passes"] = time.perf_counter() - t
    valid = ev.completion_mask(comp, end_ids)
    loss_mask = valid & (~hint_mask | igpo.entropy_filter(ent.repeat_interleave(G, 0), hint_mask & valid, args.entropy_keep))
    adv = (reward - reward.mean(1, keepdim=True)).flatten()
    t = time.perf_counter()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(args.num_iterations):
        logp = igpo.token_logps(model, prompts, comp, facts)
        loss, _, _ = igpo.grpo_loss(logp, logp_old, logp_ref, adv, loss_mask, args.epsilon, args.beta)
        loss.backward()
        opt.step()
        opt.zero_grad()
    times["updates"] = time.perf_counter() - t
    reads = {"tokens": comp.masked_fill(~valid, -1), "reward": reward, "loss_mask": loss_mask, "loss": loss.detach(),
             "hint_mask": hint_mask & valid, "generator": gen.get_state()}
    return times, reads, work


def igpo_step_phases(tok, quick):
    """Time the phases of one IGPO step with the default flags on a random embedded model (every group is
    all-wrong, so inpainting always runs: the most expensive case)."""
    args = igpo.get_args(["--limit", "0"])
    if quick:
        args.batch_prompts, args.num_generations = 2, 4
    ds = sft.toy_dataset("train", args.batch_prompts, seed=3)
    times, _, _ = igpo_step(sft.build_toy_model(tok), tok, args, list(zip(ds["question"], ds["trace"], ds["answer"])))
    total = sum(times.values())
    return {k: {"seconds": round(v, 3), "share": round(v / total, 3)} for k, v in times.items()}


def early_exit_igpo_step(ckpt, quick):
    """One IGPO step (default flags) on an SFT checkpoint with and without --early_exit, from the same weights
    and seeds: row-forwards per rollout, seconds of the rollout phases, and whether everything the step reads
    afterwards is identical (tokens up to each row's first end token, rewards, hint and loss masks, the loss,
    the rollout generator's state)."""
    args = igpo.get_args(["--limit", "0"])
    if quick:
        args.batch_prompts = 2
    ds = sft.toy_dataset("train", args.batch_prompts, seed=3)
    batch = list(zip(ds["question"], ds["trace"], ds["answer"]))
    runs = {}
    for on in (False, True, False, True):  # twice each, alternating; the faster of the two is kept
        args.early_exit = on
        model, tok, _ = sft.load_model(ckpt)
        times, reads, work = igpo_step(model, tok, args, batch)
        per_rollout = work["forwards_per_rollout"]
        seconds = times["rollouts"] + times["inpainting_rollouts_and_grading"]
        if on not in runs or seconds < runs[on][0]:
            runs[on] = (seconds, reads, per_rollout, sum(times.values()))
    (off_s, off, off_rows, off_step), (on_s, on, on_rows, on_step) = runs[False], runs[True]
    return {"checkpoint": ckpt, "forwards_per_rollout": {"off": round(off_rows, 2), "on": round(on_rows, 2)},
            "rollout_seconds": {"off": round(off_s, 2), "on": round(on_s, 2)},
            "rollout_share_of_step": {"off": round(off_s / off_step, 3), "on": round(on_s / on_step, 3)},
            "forward_ratio": on_rows / off_rows, "time_ratio": on_s / off_s,
            "identical": all(torch.equal(off[k], on[k]) for k in off)}


def early_exit_paper_shape(ends, L=256, Lb=32, steps=128, temperature=1.2):
    """The sampler at the paper's rollout shape with a model whose answer ends (<|eot_id|>) are known: row r
    ends at ends[r] (the Scripted wrapper of test_sampler.py around a tiny random model)."""
    from conftest import tiny_model
    from test_sampler import Scripted
    tok = sft.build_toy_tokenizer()
    facts = sft.model_facts(sft.build_toy_model(tok).config, tok)
    end_ids = torch.tensor(facts.end_ids)
    B, P = len(ends), 40
    prompts = torch.cat([torch.arange(B)[:, None] + 7, torch.randint(7, 100, (B, P - 1))], 1)  # row r: first token r+7
    scripts = {r + 7: torch.full((L,), -1).index_fill_(0, torch.tensor([e]), int(end_ids[0])) for r, e in enumerate(ends)}
    res = {}
    for on in (False, True, False, True):  # twice each, alternating; the faster of the two is kept
        model = Scripted(tiny_model(tok, hidden=64, layers=4), P, scripts, end_ids)
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        out = ev.generate(model, prompts, ev.Sampler(L, Lb, steps, temperature, on), facts, generator=g)[:, P:]
        seconds = time.perf_counter() - t
        if on not in res or seconds < res[on][3]:
            res[on] = (out.masked_fill(~ev.completion_mask(out, end_ids), -1), g.get_state(), model.rows / B, seconds)
    return {"L": L, "block": Lb, "steps": steps, "rows": B, "mean_end": sum(ends) / B,
            "forwards_per_rollout": {"off": res[False][2], "on": res[True][2]},
            "seconds": {"off": round(res[False][3], 2), "on": round(res[True][3], 2)},
            "forward_ratio": res[True][2] / res[False][2], "time_ratio": res[True][3] / res[False][3],
            "identical": torch.equal(res[False][0], res[True][0]) and torch.equal(res[False][1], res[True][1])}


# (confidence_threshold, kv_cache) of each measured setting; LLaDA's hub code refuses the cache (sft.MODELS)
LLADA_LEVERS = {"exact": (0.0, False), "tau 0.9": (0.9, False), "tau 0.7": (0.7, False), "tau 0.5": (0.5, False)}
DREAM_LEVERS = {"exact": (0.0, False), "tau 0.9": (0.9, False), "tau 0.7": (0.7, False), "kv_cache": (0.0, True),
                "tau 0.9 + kv_cache": (0.9, True)}


def speed_levers_igpo_step(ckpt, taus=(0.5, 0.7, 0.9), quick=False):
    """The sampler's two levers (NOTES.md §3 item 25) in one IGPO step (default flags, early exit on) from an SFT
    checkpoint, for the exact sampler and each threshold: row-forwards and positions fed per rollout, the rollout
    phases' seconds (the faster of two runs), the step's own reward and its all-wrong groups before and after the
    rescue (one step of 8 prompts: noisy; NOTES.md §8 has whole runs). The embedded model refuses the cache."""
    args = igpo.get_args(["--limit", "0"])
    if quick:
        args.batch_prompts = 2
    ds = sft.toy_dataset("train", args.batch_prompts, seed=3)
    batch = list(zip(ds["question"], ds["trace"], ds["answer"]))
    res = {}
    for tau in (0.0, *taus) * 2:  # twice each, in turn; the faster run is kept
        args.confidence_threshold = tau
        model, tok, _ = sft.load_model(ckpt)
        times, _, work = igpo_step(model, tok, args, batch)
        seconds = times["rollouts"] + times["inpainting_rollouts_and_grading"]
        if tau not in res or seconds < res[tau]["rollout_seconds"]:
            res[tau] = {**{k: round(v, 4) for k, v in work.items()}, "rollout_seconds": round(seconds, 2)}
    return {f"tau {tau}": r for tau, r in res.items()}


def speed_levers(ckpt, quick):
    """--confidence_threshold and --kv_cache (NOTES.md §3 item 25, §8): eval.py's sampler and one IGPO step on
    the SFT checkpoint ckpt (threshold only: the embedded model refuses the cache), then the paper's rollout
    shape on a tiny LLaDA (threshold only: its hub code refuses a cache) and a tiny Dream (both)."""
    res = {}
    if os.path.isdir(ckpt):
        res["speed_levers_eval"] = speed_levers_eval(ckpt, n=16 if quick else 200)
        res["speed_levers_igpo_step"] = speed_levers_igpo_step(ckpt, quick=quick)
    else:
        print(f"no checkpoint at {ckpt}: the levers on the embedded task not measured (pass --ckpt)")
    rows = 1 if quick else 2
    res["speed_levers_paper_shape_llada"] = speed_levers_paper_shape("llada", LLADA_LEVERS, rows)
    res["speed_levers_paper_shape_dream"] = speed_levers_paper_shape("dream", DREAM_LEVERS, rows)
    return res


def speed_levers_eval(ckpt, taus=(0.5, 0.7, 0.9), n=200):
    """Row-forwards per answer of eval.py's sampler (embedded defaults: L = 48, block 8, 24 steps, early exit on)
    on the first n test questions from an SFT checkpoint, greedy and at T = 1.2, for the exact sampler and each
    threshold."""
    model, tok, facts = sft.load_model(ckpt)
    model.eval()
    work = count_rows(model)
    prompts = torch.tensor([tok(sft.make_prompt(tok, q, True), add_special_tokens=False).input_ids
                            for q, _ in ev.load_task("toy", limit=n)])  # every embedded prompt has one length
    res = {}
    for temperature in (0.0, 1.2):
        for tau in (0.0, *taus):
            work[:] = [0, 0]
            sampler = ev.Sampler(48, 8, 24, temperature, True, 0, tau)
            with torch.no_grad():
                ev.generate(model, prompts, sampler, facts, generator=torch.Generator().manual_seed(0))
            res[f"T {temperature} tau {tau}"] = work[0] / n
    return res


def speed_levers_paper_shape(which, levers, rows=4, P=200, L=256, Lb=32, steps=128, temperature=1.2):
    """The sampler at the paper's rollout shape (L = 256, block 32, 128 steps, prompts of P tokens, T = 1.2, early
    exit on) on a tiny random LLaDA or Dream built from its own code (conftest.build_tiny_*; real vocabulary):
    row-forwards, positions fed and seconds per rollout for each (threshold, cache) of `levers`. The positions
    fed by the cache are the model's shape only; the threshold's forwards follow these random weights'
    confidences, not a trained model's."""
    import tempfile
    from conftest import build_tiny_dream, build_tiny_llada
    build = {"llada": build_tiny_llada, "dream": build_tiny_dream}[which]
    with tempfile.TemporaryDirectory() as tmp:
        model, _, facts = sft.load_model(build(os.path.join(tmp, which)), trust_remote_code=True)
    model.eval()
    work = count_rows(model)
    prompts = torch.randint(0, 90, (rows, P), generator=torch.Generator().manual_seed(0))  # character ids
    res = {}
    for name, (tau, cache) in levers.items():
        work[:] = [0, 0]
        sampler = ev.Sampler(L, Lb, steps, temperature, True, 0, tau, cache)
        t = time.perf_counter()
        ev.generate(model, prompts, sampler, facts, generator=torch.Generator().manual_seed(0))
        res[name] = {"forwards_per_rollout": work[0] / rows, "fed_per_rollout": work[1] / rows,
                     "seconds_per_rollout": round((time.perf_counter() - t) / rows, 2)}
    return res


def llada_gsm8k_ends(n):
    """Where LLaDA-8B-Instruct's greedy GSM8K answers end (L = 256): 256 minus the end tokens that close each
    saved generation (tests/d1_generations, d1's layout), the first n."""
    texts = [r["generations"] for r in json.load(open(LLADA_GSM8K))["generations"][:n]]
    return [256 - len(re.findall(r"<\|eot_id\|>|<\|endoftext\|>", re.search(r"(?:<\|eot_id\|>|<\|endoftext\|>)*$", t).group()))
            for t in texts]


if __name__ == "__main__":
    main()
