"""Break each rule of the paper on purpose, one line at a time, and check that its test fails.

    python tests/mutants.py                 # every mutant (about half an hour on 2 cores)
    python tests/mutants.py Eq.6 Eq.10      # only the rules whose name starts with one of these
    python tests/mutants.py --table         # print NOTES.md §12's table (rule -> test) without running

Not collected by pytest. Each mutant replaces one line (or a few characters) of sft.py, eval.py or igpo.py in a
temporary copy of the repository, runs the tests said to guard the rule, and counts it "caught" when at least
one of them fails. A rule whose line can change with every test green is untested; NOTES.md §12 lists rule ->
test from MUTANTS below, and the closing notes record the last full run.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (rule as NOTES.md names it, file, the text of the correct line(s), the broken text, tests that must fail)
MUTANTS = [
    ("Eq.1 mask probability p = (1-eps) t + eps", "sft.py",
     "p = (1 - LOG_EPS) * t + LOG_EPS", "p = t",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.2 1/p weight and 1/L normalisation", "sft.py",
     "total = total + (nll / (p[group] * L).expand(-1, L)[m]).sum()", "total = total + (nll / L).sum()",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.2 prompt never masked", "sft.py",
     "xt[:, P:] = torch.where(m, facts.mask_id, x0[:, P:])",
     "xt[:, P - 1:] = torch.where(torch.cat([m[:, :1], m], 1), facts.mask_id, x0[:, P - 1:])",
     ["test_sft.py::test_sft_loss_matches_hand_computation", "test_sft.py::test_prompt_never_masked_over_many_draws"]),
    ("Eq.3 no division by the std", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()",
     "return ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.3 mean within the group", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()", "return (reward - reward.mean()).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.4 only all-wrong groups are inpainted", "igpo.py",
     "all_wrong = (reward.sum(1) == 0).nonzero().flatten().tolist()",
     "all_wrong = (reward.sum(1) < G).nonzero().flatten().tolist()",
     ["test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.5 whole completion masked, logits at the completion", "igpo.py",
     "logits = logits_at(model, x, P, P + L, facts.shifted).float()",
     "logits = logits_at(model, x, P - 1, P + L - 1, facts.shifted).float()",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.5 each sample reads its own tokens (one pass per prompt)", "igpo.py",
     "index = samples[rows].transpose(1, 2)", "index = samples[rows].flip(1).transpose(1, 2)",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.6 pessimistic min of the two surrogates", "igpo.py",
     "surrogate = torch.min(ratio * a,", "surrogate = torch.max(ratio * a,",
     ["test_igpo.py::test_surrogate_equals_hand_computation", "test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 upper clip bound 1 + eps", "igpo.py",
     "torch.clamp(ratio, 1 - epsilon, 1 + epsilon)", "torch.clamp(ratio, 1 - epsilon, 1 + 2 * epsilon)",
     ["test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 lower clip bound 1 - eps", "igpo.py",
     "torch.clamp(ratio, 1 - epsilon, 1 + epsilon)", "torch.clamp(ratio, 1 - 2 * epsilon, 1 + epsilon)",
     ["test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 ratio against pi_old, not the current policy", "igpo.py",
     "loss, kl, clip_frac = grpo_loss(logp, logp_old[s],", "loss, kl, clip_frac = grpo_loss(logp, logp.detach(),",
     ["test_rules.py::test_mu_updates_take_the_ratio_against_pi_old"]),
    ("Eq.6 k3 KL direction", "igpo.py",
     "kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1",
     "kl = torch.exp(logp - logp_ref) - (logp - logp_ref) - 1",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 per-sequence mean over its loss tokens (NOTES §3 item 1)", "igpo.py",
     "loss = ((per_token * m).sum(1) / n_tokens).mean()", "loss = (per_token * m).sum() / m.sum()",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 pi_ref = start model (frozen copy)", "igpo.py",
     "ref_model, reference = ref_model.eval().requires_grad_(False), contextlib.nullcontext",
     "ref_model, reference = policy, contextlib.nullcontext",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref = policy with the trained adapter off (LoRA)", "igpo.py",
     "ref_model, reference = policy, lambda: trained_adapter_off(policy)",
     "ref_model, reference = policy, contextlib.nullcontext",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref keeps the SFT adapter on (LoRA on an SFT adapter)", "igpo.py",
     "policy.base_model.set_adapter(frozen, inference_mode=True)", "policy.base_model.set_adapter([], inference_mode=True)",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.7 chunk sizes U{s_min..s_max}", "igpo.py",
     "torch.randint(chunk_min, chunk_max + 1, (1,), generator=gen)",
     "torch.randint(chunk_min, chunk_max, (1,), generator=gen)",
     ["test_rules.py::test_hint_chunks_take_every_size_from_s_min_to_s_max"]),
    ("Eq.7 revealed chunks at their own positions", "igpo.py",
     "hints[a:b] = torch.tensor(trace_ids[a:b])", "hints[a + 1:b + 1] = torch.tensor(trace_ids[a:b])",
     ["test_igpo.py::test_make_hints_chunks_eta_and_positions"]),
    ("Eq.7 round(eta * #chunks) chunks revealed (NOTES §3 item 22)", "igpo.py",
     "n_reveal = round(eta * len(chunks))", "n_reveal = len(chunks)",
     ["test_igpo.py::test_make_hints_chunks_eta_and_positions"]),
    ("Eq.7 the answer is never hinted (NOTES §3 item 3)", "igpo.py",
     "return tokenizer(trace[:m.start()] if m else trace", "return tokenizer(trace",
     ["test_igpo.py::test_hints_never_contain_the_answer"]),
    ("Eq.8 K = min(#correct, floor(lambda G))", "igpo.py",
     "K = min(len(ok), math.floor(lam * G))", "K = min(len(ok), math.ceil(lam * G))",
     ["test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.8 replaced samples get reward 1", "igpo.py",
     "completions[dst], reward[b, slot] = inpainted[src], 1.0", "completions[dst] = inpainted[src]",
     ["test_igpo.py::test_replacement_rule_and_own_trace"]),
    ("Eq.10 hints filtered by entropy in the loss", "igpo.py",
     "return valid & (~hint_mask | keep)", "return valid",
     ["test_rules.py::test_loss_mask_counts_only_hints_before_the_end"]),
    ("Eq.10 only hints before the end count towards floor(tau n)", "igpo.py",
     "keep = entropy_filter(entropy, hint_mask & valid, tau)", "keep = entropy_filter(entropy, hint_mask, tau)",
     ["test_rules.py::test_loss_mask_counts_only_hints_before_the_end"]),
    ("Eq.10 at least one hint kept", "igpo.py",
     "k = torch.clamp(torch.floor(keep_frac * n_hint), min=1)", "k = torch.floor(keep_frac * n_hint)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 highest entropy kept", "igpo.py",
     "rank = score.argsort(1, descending=True).argsort(1)", "rank = (-score).argsort(1, descending=True).argsort(1)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Sampler: remainder to the first steps", "eval.py",
     "return base + (torch.arange(steps, device=mask_index.device) < rem).long()",
     "return base + (torch.arange(steps, device=mask_index.device) >= steps - rem).long()",
     ["test_sampler.py::test_schedule_is_even_with_remainder_first"]),
    ("Sampler: the most confident positions are committed", "eval.py",
     "top = confidence.topk(kmax, dim=1).indices", "top = (-confidence).topk(kmax, dim=1).indices",
     ["test_sampler.py::test_greedy_matches_reference"]),
    ("Sampler: hints never change", "eval.py",
     "confidence = torch.where(block == mask_id, confidence, NEG_INF)", "confidence = confidence",
     ["test_sampler.py::test_hints_fixed_and_schedule_followed"]),
    ("Sampler: Gumbel noise sign (NOTES §3 item 6)", "eval.py",
     "u[rows[here] - a].log_().neg_().log_().mul_(-temperature)", "u[rows[here] - a].log_().neg_().log_().mul_(temperature)",
     ["test_rules.py::test_gumbel_draw_matches_lladas_for_the_same_uniforms"]),
    ("Sampler: the mask token is never drawn (NOTES §3 item 5)", "eval.py",
     "logits[..., mask_id] = NEG_INF  # never", "pass  # never",
     ["test_rules.py::test_sampler_never_draws_the_mask_or_an_undecodable_id"]),
    ("Sampler: no id the tokenizer cannot decode", "eval.py",
     "logits[..., facts.n_tokens:] = NEG_INF", "pass",
     ["test_rules.py::test_sampler_never_draws_the_mask_or_an_undecodable_id"]),
    ("Early exit: only rows with something to commit take the forward (NOTES §3 item 17)", "eval.py",
     "run = k > 0", "run = k >= 0",
     ["test_sampler.py::test_fully_hinted_block_costs_no_forward"]),
    ("Early exit: a row leaves only after the block holding its end", "eval.py",
     "run &= ~torch.isin(x[:, P:s], end_ids).any(1)", "run &= ~torch.isin(x[:, P:], end_ids).any(1)",
     ["test_sampler.py::test_early_exit_same_tokens_rewards_loss_mask_and_generator"]),
    ("Logit shift in the estimator (Dream)", "igpo.py",
     "logits = logits_at(model, x, P, P + L, facts.shifted).float()", "logits = logits_at(model, x, P, P + L).float()",
     ["test_dream.py::test_estimator_and_sft_loss_read_the_shifted_logits"]),
    ("Logit shift in the SFT loss (Dream)", "sft.py",
     "logits = model(xt).logits[:, P - facts.shifted:P + L - facts.shifted]", "logits = model(xt).logits[:, P:P + L]",
     ["test_dream.py::test_estimator_and_sft_loss_read_the_shifted_logits"]),
    ("Logits only where they are read (NOTES §3 item 7)", "eval.py",
     "(args[0][:, start:end],)", "(args[0][:, start + 1:end + 1],)",
     ["test_sampler.py::test_greedy_matches_reference"]),
    ("Model facts: LLaDA's default LoRA targets (NOTES §3 item 19)", "sft.py",
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj")),',
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj", "ff_out")),',
     ["test_llada.py::test_lora_on_llada_targets_and_never_the_head"]),
    ("Model facts: Dream's end of turn", "sft.py",
     '"Dream": ("<|mask|>", ("<|im_end|>", EOS), True,', '"Dream": ("<|mask|>", (EOS, EOS), True,',
     ["test_dream.py::test_facts_of_dream_come_from_the_table"]),
    ("SFT stops at the first check in the regime (NOTES §3 item 20)", "sft.py",
     'stop = row["all_wrong"] <= args.stop_all_wrong', 'stop = row["all_wrong"] < args.stop_all_wrong - 0.1',
     ["test_sft.py::test_sft_stops_at_the_first_check_at_or_below_the_threshold",
      "test_sft.py::test_default_sft_stops_in_the_regime_igpo_is_for"]),
    ("SFT checks the regime from STOP_FROM on, every STOP_EVERY steps (NOTES §3 item 20)", "sft.py",
     "step >= STOP_FROM and step % STOP_EVERY == 0", "step > STOP_FROM and step % STOP_EVERY == 0",
     ["test_sft.py::test_sft_stops_at_the_first_check_at_or_below_the_threshold"]),
    ("Logit shift in the sampler (Dream)", "eval.py",
     "start, end = start - shifted, end - shifted", "start, end = start, end",
     ["test_dream.py::test_greedy_generation_equals_dreams_own_sampler"]),
    ("Reward and loss read up to the first end token (NOTES §3 item 2)", "eval.py",
     'text = strip_special(END_TOKENS.split("" if text is None else str(text), 1)[0])',
     'text = strip_special("" if text is None else str(text))',
     ["test_grader.py::test_grade_reads_only_up_to_the_first_end_token"]),
    ("Gradient accumulation: each micro-batch loss / grad_accum", "igpo.py",
     "(loss / args.grad_accum).backward()", "loss.backward()",
     ["test_rules.py::test_grad_accum_gives_the_full_batch_gradient"]),
    ("Data order: a new permutation every epoch", "sft.py",
     "generator=torch.Generator().manual_seed(seed * 100003 + k // per_epoch)",
     "generator=torch.Generator().manual_seed(seed * 100003)",
     ["test_rules.py::test_every_epoch_draws_a_new_order_of_all_prompts"]),
    ("Non-finite updates are skipped (NOTES §3 item 8)", "igpo.py",
     "if finite:  # a non-finite update", "if True:  # a non-finite update",
     ["test_reliability.py::test_nonfinite_update_is_skipped_and_counted"]),
    ("No padding enters the model (NOTES §3 item 16)", "sft.py",
     "groups.setdefault(n, []).append(i)", "groups.setdefault(0, []).append(i)",
     ["test_llada.py::test_estimator_and_sft_loss_do_not_see_other_prompts"]),
    ("Adapters stay unmerged on bf16 weights (NOTES §7)", "sft.py",
     "        if merge:\n            model = model.merge_and_unload()", "        model = model.merge_and_unload()",
     ["test_llada.py::test_bf16_load_evaluates_the_trained_adapter"]),
    ("LoRA targets: the official code's, never the head (NOTES §3 item 19)", "sft.py",
     "exclude = [n for n, m in core.named_modules() if m is head]", "exclude = []",
     ["test_llada.py::test_lora_on_llada_targets_and_never_the_head"]),
    ("MetaMathQA selection (NOTES §3 item 11)", "igpo.py",
     "first.setdefault(q, i)", "first[q] = i",
     ["test_llada.py::test_metamath_official_selection"]),
    ("RL prompts from a stream of their own (NOTES §3 item 18)", "igpo.py",
     'seed=f"rl-{args.seed}"', "seed=args.seed",
     ["test_igpo.py::test_rl_prompts_are_not_the_sft_problems"]),
    ("LR schedule steps once per batch of rollouts (NOTES §3 item 13)", "igpo.py",
     "        sched.step()\n        step += 1", "        step += 1",
     ["test_rules.py::test_schedule_steps_once_per_batch_of_rollouts"]),
    ("Eq.11 lambda = 1/2 by default (NOTES §3 item 10)", "igpo.py",
     '"--max_replace_frac", type=float, default=0.5', '"--max_replace_frac", type=float, default=0.25',
     ["test_llada.py::test_the_papers_settings_in_the_defaults_and_the_readme_commands"]),
    ("Settings: rollout temperature 1.2 (NOTES §3 item 10)", "igpo.py",
     '"--temperature", type=float, default=1.2', '"--temperature", type=float, default=1.0',
     ["test_llada.py::test_the_papers_settings_in_the_defaults_and_the_readme_commands"]),
    ("Settings: the README's paper-scale LoRA for IGPO (NOTES §3 item 10)", "README.md",
     "--lora_r 128 --grad_ckpt --limit 0 --max_steps 500 --out_dir out/igpo_llada",
     "--lora_r 64 --grad_ckpt --limit 0 --max_steps 500 --out_dir out/igpo_llada",
     ["test_llada.py::test_the_papers_settings_in_the_defaults_and_the_readme_commands"]),
    ("Reward extraction: the last box wins (NOTES §3 item 21)", "eval.py",
     "for _, a, b in sorted(spans, reverse=True):", "for _, a, b in sorted(spans):",
     ["test_grader.py::test_extract_answer"]),
    ("Prompt format: the instruction, then the question, in one user turn (NOTES §3 item 23)", "sft.py",
     "content = question if toy else REASONING_PROMPT + question",
     "content = question if toy else question + REASONING_PROMPT",
     ["test_sft.py::test_prompt_format"]),
    ("Rewrite filter: the rewrite's final answer grades equal to the original's (NOTES §3 item 9)", "sft.py",
     "if fits[i] and same_answer(r, t)]", "if fits[i]]",
     ["test_sft.py::test_rewrite_keeps_the_same_answer_that_fits_and_counts"]),
    ("Rewrite filter: the rewrite fits L in the policy's tokenizer (NOTES §3 item 9)", "sft.py",
     "fits = [encode_response(tokenizer, r, L, facts.end_ids) is not None for r in rewrites]",
     "fits = [encode_response(tokenizer, r, 2 * L, facts.end_ids) is not None for r in rewrites]",
     ["test_sft.py::test_rewrite_keeps_the_same_answer_that_fits_and_counts"]),
    ("Precision: bf16 computes, trained weights stay fp32 (NOTES §7)", "sft.py",
     "dtype = torch.bfloat16 if bf16 and frozen_base else torch.float32",
     "dtype = torch.bfloat16 if bf16 else torch.float32",
     ["test_llada.py::test_bf16_policy_moves_weights_like_fp32"]),
]


def run(selected):
    results = []
    for rule, path, old, new, tests in selected:
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "repo")
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("out", ".git", "__pycache__", ".pytest_cache"))
            src = open(os.path.join(copy, path)).read()
            if src.count(old) != 1:
                results.append((rule, "NOT APPLIED (line not found once)", tests))
                continue
            open(os.path.join(copy, path), "w").write(src.replace(old, new))
            t = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                *[os.path.join("tests", name) for name in tests]], cwd=copy, capture_output=True,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
            verdict = "caught" if r.returncode != 0 else "MISSED"
            results.append((rule, f"{verdict} ({time.time() - t:.0f} s)", tests))
        print(f"{results[-1][1]:>24}  {rule}", flush=True)
    return results


if __name__ == "__main__":
    if "--table" in sys.argv:
        for rule, path, _, _, tests in MUTANTS:
            print(f"| {rule} | `{path}` | {', '.join(f'`{t}`' for t in tests)} |")
        sys.exit(0)
    prefixes = sys.argv[1:]
    chosen = [m for m in MUTANTS if not prefixes or any(m[0].startswith(p) for p in prefixes)]
    results = run(chosen)
    missed = [r for r in results if not r[1].startswith("caught")]
    print(f"{len(results) - len(missed)} of {len(results)} mutants caught")
    sys.exit(1 if missed else 0)
