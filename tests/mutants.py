"""Break each rule of the paper on purpose, one line at a time, and check that its test fails.

    python tests/mutants.py                 # every mutant (about half an hour on 2 cores)
    python tests/mutants.py Eq.6 Eq.10      # only the rules whose name starts with one of these
    python tests/mutants.py --table         # print NOTES.md §12's table (rule -> wrong versions -> tests)
    python tests/mutants.py --everyday      # each mutant against the everyday command's tests (-m "not slow")

Not collected by pytest. Each mutant replaces one line (or a few) of sft.py, eval.py or igpo.py in a temporary
copy of the repository, runs the tests said to guard the rule, and counts it "caught" when at least one of them
fails. A rule whose line can change with every test green is untested. A rule has its first mutant (the rule's
name alone) and variants, other wrong versions of the same line a fork could plausibly write (the rule's name +
" [variant: ...]"). Before any mutant, the tests they list are run once on the unchanged copy: they must pass
there, or "caught" would mean nothing. NOTES.md §12's table is printed from MUTANTS below (--table), and its
text records the last full run.
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
    ("Eq.1 mask probability p = (1-eps) t + eps [variant: no eps floor]", "sft.py",
     "p = (1 - LOG_EPS) * t + LOG_EPS", "p = (1 - LOG_EPS) * t",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.1 mask probability p = (1-eps) t + eps [variant: eps = 1e-2]", "sft.py",
     "LOG_EPS = 1e-3  #", "LOG_EPS = 1e-2  #",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.2 1/p weight and 1/L normalisation", "sft.py",
     "total = total + (nll / (p[group] * L).expand(-1, L)[m]).sum()", "total = total + (nll / L).sum()",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.2 1/p weight and 1/L normalisation [variant: by the masked count]", "sft.py",
     "total = total + (nll / (p[group] * L).expand(-1, L)[m]).sum()",
     "total = total + (nll / (p[group] * m.sum(1, keepdim=True)).expand(-1, L)[m]).sum()",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.2 1/p weight and 1/L normalisation [variant: summed over the batch]", "sft.py",
     "    return total / B\n", "    return total\n",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.2 prompt never masked", "sft.py",
     "xt[:, P:] = torch.where(m, facts.mask_id, x0[:, P:])",
     "xt[:, P - 1:] = torch.where(torch.cat([m[:, :1], m], 1), facts.mask_id, x0[:, P - 1:])",
     ["test_sft.py::test_sft_loss_matches_hand_computation", "test_sft.py::test_prompt_never_masked_over_many_draws"]),
    ("Eq.2 prompt never masked [variant: first response token never masked]", "sft.py",
     "xt[:, P:] = torch.where(m, facts.mask_id, x0[:, P:])",
     "xt[:, P + 1:] = torch.where(m[:, 1:], facts.mask_id, x0[:, P + 1:])",
     ["test_sft.py::test_sft_loss_matches_hand_computation"]),
    ("Eq.3 no division by the std", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()",
     "return ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.3 no division by the std [variant: the batch's std]", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()",
     "return ((reward - reward.mean(1, keepdim=True)) / (reward.std() + 1e-4)).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.3 mean within the group", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()", "return (reward - reward.mean()).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.3 mean within the group [variant: mean over the other axis]", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()", "return (reward - reward.mean(0, keepdim=True)).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.3 mean within the group [variant: leave-one-out mean]", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()",
     "return (reward - (reward.sum(1, keepdim=True) - reward) / (reward.shape[1] - 1)).flatten()",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.3 mean within the group [variant: group means tiled, not repeated per sample]", "igpo.py",
     "return (reward - reward.mean(1, keepdim=True)).flatten()",
     "return reward.flatten() - reward.mean(1).repeat(reward.shape[1])",
     ["test_igpo.py::test_all_wrong_group_has_zero_advantage"]),
    ("Eq.4 only all-wrong groups are inpainted", "igpo.py",
     "all_wrong = (reward.sum(1) == 0).nonzero().flatten().tolist()",
     "all_wrong = (reward.sum(1) < G).nonzero().flatten().tolist()",
     ["test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.4 only all-wrong groups are inpainted [variant: all-right groups too]", "igpo.py",
     "all_wrong = (reward.sum(1) == 0).nonzero().flatten().tolist()",
     "all_wrong = ((reward.sum(1) == 0) | (reward.sum(1) == G)).nonzero().flatten().tolist()",
     ["test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.4 only all-wrong groups are inpainted [variant: at most one right]", "igpo.py",
     "all_wrong = (reward.sum(1) == 0).nonzero().flatten().tolist()",
     "all_wrong = (reward.sum(1) <= 1).nonzero().flatten().tolist()",
     ["test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.5 whole completion masked, logits at the completion", "igpo.py",
     "logits = logits_at(model, x, P, P + L, facts.shifted).float()",
     "logits = logits_at(model, x, P - 1, P + L - 1, facts.shifted).float()",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.5 whole completion masked, logits at the completion [variant: normalised over positions]", "igpo.py",
     "lse = logits.logsumexp(-1, keepdim=True)", "lse = logits.logsumexp(1, keepdim=True)",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.5 each sample reads its own tokens (one pass per prompt)", "igpo.py",
     "index = samples[rows].transpose(1, 2)", "index = samples[rows].flip(1).transpose(1, 2)",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.5 each sample reads its own tokens (one pass per prompt) [variant: reshape for transpose]", "igpo.py",
     "index = samples[rows].transpose(1, 2)", "index = samples[rows].reshape(len(rows), L, -1)",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.5 each sample reads its own tokens (one pass per prompt) [variant: length groups not put back in prompt order]",
     "igpo.py", "logp = torch.cat(logps)[back].reshape(-1, L)", "logp = torch.cat(logps).reshape(-1, L)",
     ["test_igpo.py::test_estimator_equals_per_sample_hand_computation"]),
    ("Eq.6 pessimistic min of the two surrogates", "igpo.py",
     "surrogate = torch.min(ratio * a,", "surrogate = torch.max(ratio * a,",
     ["test_igpo.py::test_surrogate_equals_hand_computation", "test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 pessimistic min of the two surrogates [variant: the clipped term only]", "igpo.py",
     "surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)",
     "surrogate = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a",
     ["test_igpo.py::test_surrogate_equals_hand_computation", "test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 pessimistic min of the two surrogates [variant: no clip]", "igpo.py",
     "surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)", "surrogate = ratio * a",
     ["test_igpo.py::test_surrogate_equals_hand_computation", "test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 upper clip bound 1 + eps", "igpo.py",
     "torch.clamp(ratio, 1 - epsilon, 1 + epsilon)", "torch.clamp(ratio, 1 - epsilon, 1 + 2 * epsilon)",
     ["test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 upper clip bound 1 + eps [variant: 1/(1-eps)]", "igpo.py",
     "torch.clamp(ratio, 1 - epsilon, 1 + epsilon)", "torch.clamp(ratio, 1 - epsilon, 1 / (1 - epsilon))",
     ["test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 lower clip bound 1 - eps", "igpo.py",
     "torch.clamp(ratio, 1 - epsilon, 1 + epsilon)", "torch.clamp(ratio, 1 - 2 * epsilon, 1 + epsilon)",
     ["test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 lower clip bound 1 - eps [variant: 1/(1+eps)]", "igpo.py",
     "torch.clamp(ratio, 1 - epsilon, 1 + epsilon)", "torch.clamp(ratio, 1 / (1 + epsilon), 1 + epsilon)",
     ["test_rules.py::test_clip_bounds_on_both_sides"]),
    ("Eq.6 ratio against pi_old, not the current policy", "igpo.py",
     "loss, kl, clip_frac = grpo_loss(logp, logp_old[s],", "loss, kl, clip_frac = grpo_loss(logp, logp.detach(),",
     ["test_rules.py::test_mu_updates_take_the_ratio_against_pi_old"]),
    ("Eq.6 ratio against pi_old, not the current policy [variant: against pi_ref]", "igpo.py",
     "loss, kl, clip_frac = grpo_loss(logp, logp_old[s],", "loss, kl, clip_frac = grpo_loss(logp, logp_ref[s],",
     ["test_rules.py::test_mu_updates_take_the_ratio_against_pi_old"]),
    ("Eq.6 k3 KL direction", "igpo.py",
     "kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1",
     "kl = torch.exp(logp - logp_ref) - (logp - logp_ref) - 1",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 k3 KL direction [variant: k1 estimator]", "igpo.py",
     "kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1", "kl = (logp - logp_ref)",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 k3 KL direction [variant: k2 estimator]", "igpo.py",
     "kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1", "kl = 0.5 * (logp - logp_ref) ** 2",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 per-sequence mean over its loss tokens (NOTES §3 item 1)", "igpo.py",
     "loss = ((per_token * m).sum(1) / n_tokens).mean()", "loss = (per_token * m).sum() / m.sum()",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 per-sequence mean over its loss tokens (NOTES §3 item 1) [variant: a constant L per sequence]", "igpo.py",
     "n_tokens = m.sum(1).clamp(min=1)", "n_tokens = torch.full_like(m[:, 0], m.shape[1])",
     ["test_igpo.py::test_surrogate_equals_hand_computation"]),
    ("Eq.6 pi_ref = start model (frozen copy)", "igpo.py",
     "ref_model, reference = ref_model.eval().requires_grad_(False), contextlib.nullcontext",
     "ref_model, reference = policy, contextlib.nullcontext",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref = start model (frozen copy) [variant: a copy of the policy as loaded]", "igpo.py",
     "ref_model = load_model(args.model, args.trust_remote_code, device, torch.float32, merge=True)[0]",
     'ref_model = __import__("copy").deepcopy(policy)',
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref = policy with the trained adapter off (LoRA)", "igpo.py",
     "ref_model, reference = policy, lambda: trained_adapter_off(policy)",
     "ref_model, reference = policy, contextlib.nullcontext",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref = policy with the trained adapter off (LoRA) [variant: adapter left off after pi_ref]", "igpo.py",
     'policy.base_model.set_adapter(frozen + ["default"])', "policy.base_model.set_adapter(frozen)",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref keeps the SFT adapter on (LoRA on an SFT adapter)", "igpo.py",
     "policy.base_model.set_adapter(frozen, inference_mode=True)", "policy.base_model.set_adapter([], inference_mode=True)",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.6 pi_ref keeps the SFT adapter on (LoRA on an SFT adapter) [variant: PEFT's disable_adapter]", "igpo.py",
     "ref_model, reference = policy, lambda: trained_adapter_off(policy)",
     "ref_model, reference = policy, lambda: policy.disable_adapter()",
     ["test_rules.py::test_kl_reference_is_the_start_model"]),
    ("Eq.7 eta ~ U[eta_low, eta_high] for each canvas", "igpo.py",
     "eta = args.eta_low + (args.eta_high - args.eta_low) * float(torch.rand(1, generator=gen))",
     "eta = args.eta_high",
     ["test_igpo.py::test_eta_is_drawn_uniformly_for_each_canvas"]),
    ("Eq.7 eta ~ U[eta_low, eta_high] for each canvas [variant: one eta per trace]", "igpo.py",
     "        for _ in range(args.num_generations):\n"
     "            eta = args.eta_low + (args.eta_high - args.eta_low) * float(torch.rand(1, generator=gen))\n",
     "        eta = args.eta_low + (args.eta_high - args.eta_low) * float(torch.rand(1, generator=gen))\n"
     "        for _ in range(args.num_generations):\n",
     ["test_igpo.py::test_eta_is_drawn_uniformly_for_each_canvas"]),
    ("Eq.7 eta ~ U[eta_low, eta_high] for each canvas [variant: U[0, eta_high]]", "igpo.py",
     "eta = args.eta_low + (args.eta_high - args.eta_low) * float(torch.rand(1, generator=gen))",
     "eta = args.eta_high * float(torch.rand(1, generator=gen))",
     ["test_igpo.py::test_eta_is_drawn_uniformly_for_each_canvas"]),
    ("Eq.7 chunk sizes U{s_min..s_max}", "igpo.py",
     "torch.randint(chunk_min, chunk_max + 1, (1,), generator=gen)",
     "torch.randint(chunk_min, chunk_max, (1,), generator=gen)",
     ["test_rules.py::test_hint_chunks_take_every_size_from_s_min_to_s_max"]),
    ("Eq.7 chunk sizes U{s_min..s_max} [variant: from s_min - 1]", "igpo.py",
     "torch.randint(chunk_min, chunk_max + 1, (1,), generator=gen)",
     "torch.randint(chunk_min - 1, chunk_max + 1, (1,), generator=gen)",
     ["test_rules.py::test_hint_chunks_take_every_size_from_s_min_to_s_max"]),
    ("Eq.7 chunk sizes U{s_min..s_max} [variant: the shorter last chunk dropped]", "igpo.py",
     "chunks.append((pos, min(pos + size, n)))", "chunks += [(pos, pos + size)] if pos + size <= n else []",
     ["test_rules.py::test_hint_chunks_take_every_size_from_s_min_to_s_max"]),
    ("Eq.7 revealed chunks at their own positions", "igpo.py",
     "hints[a:b] = torch.tensor(trace_ids[a:b])", "hints[a + 1:b + 1] = torch.tensor(trace_ids[a:b])",
     ["test_igpo.py::test_make_hints_chunks_eta_and_positions"]),
    ("Eq.7 revealed chunks at their own positions [variant: each chunk's last token left out]", "igpo.py",
     "hints[a:b] = torch.tensor(trace_ids[a:b])", "hints[a:b - 1] = torch.tensor(trace_ids[a:b - 1])",
     ["test_igpo.py::test_make_hints_chunks_eta_and_positions"]),
    ("Eq.7 round(eta * #chunks) chunks revealed (NOTES §3 item 22)", "igpo.py",
     "n_reveal = round(eta * len(chunks))", "n_reveal = len(chunks)",
     ["test_igpo.py::test_make_hints_chunks_eta_and_positions"]),
    ("Eq.7 round(eta * #chunks) chunks revealed (NOTES §3 item 22) [variant: ceil]", "igpo.py",
     "n_reveal = round(eta * len(chunks))", "n_reveal = math.ceil(eta * len(chunks))",
     ["test_igpo.py::test_revealed_chunk_count_is_eta_times_chunks_rounded_half_to_even"]),
    ("Eq.7 round(eta * #chunks) chunks revealed (NOTES §3 item 22) [variant: floor]", "igpo.py",
     "n_reveal = round(eta * len(chunks))", "n_reveal = int(eta * len(chunks))",
     ["test_igpo.py::test_revealed_chunk_count_is_eta_times_chunks_rounded_half_to_even"]),
    ("Eq.7 round(eta * #chunks) chunks revealed (NOTES §3 item 22) [variant: halves up]", "igpo.py",
     "n_reveal = round(eta * len(chunks))", "n_reveal = math.floor(eta * len(chunks) + 0.5)",
     ["test_igpo.py::test_revealed_chunk_count_is_eta_times_chunks_rounded_half_to_even"]),
    ("Eq.7 round(eta * #chunks) chunks revealed (NOTES §3 item 22) [variant: eta * #tokens]", "igpo.py",
     "n_reveal = round(eta * len(chunks))", "n_reveal = round(eta * len(trace_ids))",
     ["test_igpo.py::test_revealed_chunk_count_is_eta_times_chunks_rounded_half_to_even"]),
    ("Eq.7 the answer is never hinted (NOTES §3 item 3)", "igpo.py",
     "ids = tokenizer(trace[:m.start()] if m else trace", "ids = tokenizer(trace",
     ["test_igpo.py::test_hints_never_contain_the_answer"]),
    ("Eq.7 the answer is never hinted (NOTES §3 item 3) [variant: cut at the last marker]", "igpo.py",
     "m = ANSWER_START.search(trace)", "m = ([None] + list(ANSWER_START.finditer(trace)))[-1]",
     ["test_igpo.py::test_hints_never_contain_the_answer",
      "test_llada.py::test_hints_never_reveal_the_answer_of_metamath_rows"]),
    ("Eq.7 the answer is never hinted (NOTES §3 item 3) [variant: <answer> not a marker]", "igpo.py",
     r'ANSWER_START = re.compile(r"####|\\boxed|The answer is|<answer>")',
     r'ANSWER_START = re.compile(r"####|\\boxed|The answer is")',
     ["test_igpo.py::test_hints_never_contain_the_answer"]),
    ("Eq.7 hints leave the last ceil(30/256 L) positions free (NOTES §3 item 3)", "igpo.py",
     "return ids[:gen_length - room]", "return ids[:gen_length]",
     ["test_llada.py::test_inpainting_a_long_trace_leaves_room_for_the_answer"]),
    ("Eq.7 hints leave the last ceil(30/256 L) positions free (NOTES §3 item 3) [variant: floor]", "igpo.py",
     "room = math.ceil(ANSWER_ROOM * gen_length)", "room = math.floor(ANSWER_ROOM * gen_length)",
     ["test_llada.py::test_inpainting_a_long_trace_leaves_room_for_the_answer"]),
    ("Eq.7 hints leave the last ceil(30/256 L) positions free (NOTES §3 item 3) [variant: round]", "igpo.py",
     "room = math.ceil(ANSWER_ROOM * gen_length)", "room = round(ANSWER_ROOM * gen_length)",
     ["test_llada.py::test_inpainting_a_long_trace_leaves_room_for_the_answer"]),
    ("Eq.8 K = min(#correct, floor(lambda G))", "igpo.py",
     "K = min(len(ok), math.floor(lam * G))", "K = min(len(ok), math.ceil(lam * G))",
     ["test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.8 K = min(#correct, floor(lambda G)) [variant: round]", "igpo.py",
     "K = min(len(ok), math.floor(lam * G))", "K = min(len(ok), round(lam * G))",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.8 K = min(#correct, floor(lambda G)) [variant: no cap]", "igpo.py",
     "K = min(len(ok), math.floor(lam * G))", "K = len(ok)",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints",
      "test_rules.py::test_step_inpaints_only_all_wrong_groups_replaces_floor_lambda_g_and_filters_hints"]),
    ("Eq.8 each replacement is a right inpainted sample of the group's own canvases", "igpo.py",
     "src, dst = g * G + j, b * G + slot", "src, dst = g * G + slot, b * G + slot",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.8 each replacement is a right inpainted sample of the group's own canvases [variant: indexed by batch group]",
     "igpo.py", "src, dst = g * G + j, b * G + slot", "src, dst = b * G + j, b * G + slot",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.8 replaced samples get reward 1", "igpo.py",
     "completions[dst], reward[b, slot] = inpainted[src], 1.0", "completions[dst] = inpainted[src]",
     ["test_igpo.py::test_replacement_rule_and_own_trace"]),
    ("Eq.8 replaced samples get reward 1 [variant: at the inpainted sample's index]", "igpo.py",
     "completions[dst], reward[b, slot] = inpainted[src], 1.0", "completions[dst], reward[b, j] = inpainted[src], 1.0",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.8 hint_mask marks exactly the injected hint tokens", "igpo.py",
     "hint_mask[dst] = hints[src] != mask_id", "hint_mask[dst] = True",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.8 hint_mask marks exactly the injected hint tokens [variant: the canvas of the slot]", "igpo.py",
     "hint_mask[dst] = hints[src] != mask_id", "hint_mask[dst] = hints[g * G + slot] != mask_id",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.8 hint_mask marks exactly the injected hint tokens [variant: written at the source row]", "igpo.py",
     "hint_mask[dst] = hints[src] != mask_id", "hint_mask[src] = hints[src] != mask_id",
     ["test_igpo.py::test_replacement_marks_exactly_the_injected_hints"]),
    ("Eq.10 hints filtered by entropy in the loss", "igpo.py",
     "return valid & (~hint_mask | keep)", "return valid",
     ["test_rules.py::test_loss_mask_counts_only_hints_before_the_end"]),
    ("Eq.10 hints filtered by entropy in the loss [variant: self-generated tokens dropped too]", "igpo.py",
     "return valid & (~hint_mask | keep)", "return valid & keep",
     ["test_rules.py::test_loss_mask_counts_only_hints_before_the_end"]),
    ("Eq.10 hints filtered by entropy in the loss [variant: the tail after the end read]", "igpo.py",
     "return valid & (~hint_mask | keep)", "return ~hint_mask | keep",
     ["test_rules.py::test_loss_mask_counts_only_hints_before_the_end"]),
    ("Eq.10 only hints before the end count towards floor(tau n)", "igpo.py",
     "keep = entropy_filter(entropy, hint_mask & valid, tau)", "keep = entropy_filter(entropy, hint_mask, tau)",
     ["test_rules.py::test_loss_mask_counts_only_hints_before_the_end"]),
    ("Eq.10 at least one hint kept", "igpo.py",
     "k = torch.clamp(torch.floor(keep_frac * n_hint), min=1)", "k = torch.floor(keep_frac * n_hint)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 at least one hint kept [variant: ceil]", "igpo.py",
     "k = torch.clamp(torch.floor(keep_frac * n_hint), min=1)", "k = torch.clamp(torch.ceil(keep_frac * n_hint), min=1)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 at least one hint kept [variant: round]", "igpo.py",
     "k = torch.clamp(torch.floor(keep_frac * n_hint), min=1)", "k = torch.clamp(torch.round(keep_frac * n_hint), min=1)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 at least one hint kept [variant: n counted over the batch]", "igpo.py",
     "n_hint = hint_mask.sum(1, keepdim=True)", "n_hint = hint_mask.sum()",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 highest entropy kept", "igpo.py",
     "rank = score.argsort(1, descending=True).argsort(1)", "rank = (-score).argsort(1, descending=True).argsort(1)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 highest entropy kept [variant: order for rank]", "igpo.py",
     "rank = score.argsort(1, descending=True).argsort(1)", "rank = score.argsort(1, descending=True)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Eq.10 highest entropy kept [variant: ranked along the batch axis]", "igpo.py",
     "rank = score.argsort(1, descending=True).argsort(1)", "rank = score.argsort(0, descending=True).argsort(0)",
     ["test_igpo.py::test_entropy_filter_keeps_top_tau_hints"]),
    ("Sampler: remainder to the first steps", "eval.py",
     "return base + (torch.arange(steps, device=mask_index.device) < rem).long()",
     "return base + (torch.arange(steps, device=mask_index.device) >= steps - rem).long()",
     ["test_sampler.py::test_schedule_is_even_with_remainder_first"]),
    ("Sampler: remainder to the first steps [variant: one step more]", "eval.py",
     "return base + (torch.arange(steps, device=mask_index.device) < rem).long()",
     "return base + (torch.arange(steps, device=mask_index.device) <= rem).long()",
     ["test_sampler.py::test_schedule_is_even_with_remainder_first"]),
    ("Sampler: the most confident positions are committed", "eval.py",
     "top = confidence.topk(kmax, dim=1).indices", "top = (-confidence).topk(kmax, dim=1).indices",
     ["test_sampler.py::test_greedy_matches_reference"]),
    ("Sampler: the most confident positions are committed [variant: one more per row]", "eval.py",
     "keep = torch.arange(kmax, device=block.device) < k[:, None]",
     "keep = torch.arange(kmax, device=block.device) <= k[:, None]",
     ["test_sampler.py::test_hints_fixed_and_schedule_followed", "test_sampler.py::test_greedy_matches_reference"]),
    ("Sampler: hints never change", "eval.py",
     "confidence = torch.where(block == mask_id, confidence, NEG_INF)", "confidence = confidence",
     ["test_sampler.py::test_hints_fixed_and_schedule_followed"]),
    ("Sampler: hints never change [variant: the schedule counts hint positions]", "eval.py",
     "n_transfer = num_transfer_tokens(x[:, s:e] == mask_id, steps)",
     "n_transfer = num_transfer_tokens(torch.ones_like(x[:, s:e], dtype=torch.bool), steps)",
     ["test_sampler.py::test_hints_fixed_and_schedule_followed"]),
    ("Sampler: hints never change [variant: hints never placed]", "eval.py",
     "        x[:, P:] = hints\n", "        pass\n",
     ["test_sampler.py::test_hints_fixed_and_schedule_followed"]),
    ("Sampler: Gumbel noise sign (NOTES §3 item 6)", "eval.py",
     "u[rows[here] - a].log_().neg_().log_().mul_(-temperature)", "u[rows[here] - a].log_().neg_().log_().mul_(temperature)",
     ["test_rules.py::test_gumbel_draw_matches_lladas_for_the_same_uniforms"]),
    ("Sampler: Gumbel noise sign (NOTES §3 item 6) [variant: noise not scaled by T]", "eval.py",
     "u[rows[here] - a].log_().neg_().log_().mul_(-temperature)", "u[rows[here] - a].log_().neg_().log_().mul_(-1.0)",
     ["test_rules.py::test_gumbel_draw_matches_lladas_for_the_same_uniforms"]),
    ("Sampler: the mask token is never drawn (NOTES §3 item 5)", "eval.py",
     "logits[..., mask_id] = NEG_INF  # never", "pass  # never",
     ["test_rules.py::test_sampler_never_draws_the_mask_or_an_undecodable_id"]),
    ("Sampler: no id the tokenizer cannot decode", "eval.py",
     "logits[..., facts.n_tokens:] = NEG_INF", "pass",
     ["test_rules.py::test_sampler_never_draws_the_mask_or_an_undecodable_id"]),
    ("Sampler: no id the tokenizer cannot decode [variant: from n_tokens + 1]", "eval.py",
     "logits[..., facts.n_tokens:] = NEG_INF", "logits[..., facts.n_tokens + 1:] = NEG_INF",
     ["test_rules.py::test_sampler_never_draws_the_mask_or_an_undecodable_id"]),
    ("Sampler: no id the tokenizer cannot decode [variant: from n_tokens - 1]", "eval.py",
     "logits[..., facts.n_tokens:] = NEG_INF", "logits[..., facts.n_tokens - 1:] = NEG_INF",
     ["test_rules.py::test_sampler_never_draws_the_mask_or_an_undecodable_id"]),
    ("Early exit: only rows with something to commit take the forward (NOTES §3 item 17)", "eval.py",
     "run = k > 0", "run = k >= 0",
     ["test_sampler.py::test_fully_hinted_block_costs_no_forward"]),
    ("Early exit: only rows with something to commit take the forward (NOTES §3 item 17) [variant: k > 1]", "eval.py",
     "run = k > 0", "run = k > 1",
     ["test_sampler.py::test_fully_hinted_block_costs_no_forward", "test_sampler.py::test_greedy_matches_reference"]),
    ("Early exit: a row leaves only after the block holding its end", "eval.py",
     "run &= ~torch.isin(x[:, P:s], end_ids).any(1)", "run &= ~torch.isin(x[:, P:], end_ids).any(1)",
     ["test_sampler.py::test_early_exit_same_tokens_rewards_loss_mask_and_generator"]),
    ("Logit shift in the estimator (Dream)", "igpo.py",
     "logits = logits_at(model, x, P, P + L, facts.shifted).float()", "logits = logits_at(model, x, P, P + L).float()",
     ["test_dream.py::test_estimator_and_sft_loss_read_the_shifted_logits"]),
    ("Logit shift in the estimator (Dream) [variant: shifted twice]", "igpo.py",
     "logits = logits_at(model, x, P, P + L, facts.shifted).float()",
     "logits = logits_at(model, x, P - facts.shifted, P + L - facts.shifted, facts.shifted).float()",
     ["test_dream.py::test_estimator_and_sft_loss_read_the_shifted_logits"]),
    ("Logit shift in the SFT loss (Dream)", "sft.py",
     "logits = model(xt).logits[:, P - facts.shifted:P + L - facts.shifted]", "logits = model(xt).logits[:, P:P + L]",
     ["test_dream.py::test_estimator_and_sft_loss_read_the_shifted_logits"]),
    ("Logit shift in the SFT loss (Dream) [variant: shifted the other way]", "sft.py",
     "logits = model(xt).logits[:, P - facts.shifted:P + L - facts.shifted]",
     "logits = model(xt).logits[:, P + facts.shifted:P + L + facts.shifted]",
     ["test_dream.py::test_estimator_and_sft_loss_read_the_shifted_logits"]),
    ("Logits only where they are read (NOTES §3 item 7)", "eval.py",
     "(args[0][:, start:end],)", "(args[0][:, start + 1:end + 1],)",
     ["test_sampler.py::test_greedy_matches_reference"]),
    ("Logits only where they are read (NOTES §3 item 7) [variant: one to the left]", "eval.py",
     "(args[0][:, start:end],)", "(args[0][:, start - 1:end - 1],)",
     ["test_sampler.py::test_greedy_matches_reference"]),
    ("Model facts: LLaDA's default LoRA targets (NOTES §3 item 19)", "sft.py",
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj"), False),',
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj", "ff_out"), False),',
     ["test_llada.py::test_lora_on_llada_targets_and_never_the_head"]),
    ("Model facts: LLaDA's default LoRA targets (NOTES §3 item 19) [variant: all seven block projections]", "sft.py",
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj"), False),',
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"), False),',
     ["test_llada.py::test_lora_on_llada_targets_and_never_the_head"]),
    ("Model facts: LLaDA's default LoRA targets (NOTES §3 item 19) [variant: attention only]", "sft.py",
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj"), False),',
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj"), False),',
     ["test_llada.py::test_lora_on_llada_targets_and_never_the_head"]),
    ("Model facts: Dream's end of turn", "sft.py",
     '"Dream": ("<|mask|>", ("<|im_end|>", EOS), True,', '"Dream": ("<|mask|>", (EOS, EOS), True,',
     ["test_dream.py::test_facts_of_dream_come_from_the_table"]),
    ("Model facts: Dream's end of turn [variant: end of turn and padding swapped]", "sft.py",
     '"Dream": ("<|mask|>", ("<|im_end|>", EOS), True,', '"Dream": ("<|mask|>", (EOS, "<|im_end|>"), True,',
     ["test_dream.py::test_facts_of_dream_come_from_the_table"]),
    ("SFT stops at the first check in the regime (NOTES §3 item 20)", "sft.py",
     'stop = row["all_wrong"] <= args.stop_all_wrong', 'stop = row["all_wrong"] < args.stop_all_wrong - 0.1',
     ["test_sft.py::test_sft_stops_at_the_first_check_at_or_below_the_threshold"]),
    ("SFT stops at the first check in the regime (NOTES §3 item 20) [variant: strictly below]", "sft.py",
     'stop = row["all_wrong"] <= args.stop_all_wrong', 'stop = row["all_wrong"] < args.stop_all_wrong',
     ["test_sft.py::test_sft_stops_at_the_first_check_at_or_below_the_threshold"]),
    ("SFT checks the regime from STOP_FROM on, every STOP_EVERY steps (NOTES §3 item 20)", "sft.py",
     "step >= STOP_FROM and step % STOP_EVERY == 0", "step > STOP_FROM and step % STOP_EVERY == 0",
     ["test_sft.py::test_sft_stops_at_the_first_check_at_or_below_the_threshold"]),
    ("SFT checks the regime from STOP_FROM on, every STOP_EVERY steps (NOTES §3 item 20) [variant: one step late]",
     "sft.py", "step >= STOP_FROM and step % STOP_EVERY == 0", "step >= STOP_FROM and step % STOP_EVERY == 1",
     ["test_sft.py::test_sft_stops_at_the_first_check_at_or_below_the_threshold"]),
    ("Logit shift in the sampler (Dream)", "eval.py",
     "start, end = start - shifted, end - shifted", "start, end = start, end",
     ["test_dream.py::test_greedy_generation_equals_dreams_own_sampler"]),
    ("Logit shift in the sampler (Dream) [variant: shifted the other way]", "eval.py",
     "start, end = start - shifted, end - shifted", "start, end = start + shifted, end + shifted",
     ["test_dream.py::test_greedy_generation_equals_dreams_own_sampler"]),
    ("Reward and loss read up to the first end token (NOTES §3 item 2)", "eval.py",
     'text = strip_special(END_TOKENS.split("" if text is None else str(text), 1)[0])',
     'text = strip_special("" if text is None else str(text))',
     ["test_grader.py::test_grade_reads_only_up_to_the_first_end_token"]),
    ("Reward and loss read up to the first end token (NOTES §3 item 2) [variant: the loss mask stops before it]",
     "eval.py", "after_end = (is_end.long().cumsum(1) - is_end.long()) > 0", "after_end = is_end.long().cumsum(1) > 0",
     ["test_igpo.py::test_eos_tail_not_in_loss", "test_grader.py::test_reward_and_loss_mask_see_the_same_tokens"]),
    ("Reward and loss read up to the first end token (NOTES §3 item 2) [variant: the reward ends at end of turn only]",
     "eval.py", "for _, ends, *_ in MODELS.values() for t in ends}", "for _, ends, *_ in MODELS.values() for t in ends[:1]}",
     ["test_grader.py::test_grade_reads_only_up_to_the_first_end_token"]),
    ("Gradient accumulation: each micro-batch loss / grad_accum", "igpo.py",
     "(loss / len(micro)).backward()", "loss.backward()",
     ["test_rules.py::test_grad_accum_gives_the_full_batch_gradient"]),
    ("Gradient accumulation: each micro-batch loss / grad_accum [variant: sample rows not scaled by G]", "igpo.py",
     "slice(a * G, (a + mb) * G)", "slice(a, a + mb * G)",
     ["test_rules.py::test_grad_accum_gives_the_full_batch_gradient"]),
    ("RL step: the update's gradient is clipped to --grad_clip", "igpo.py",
     "grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)",
     "grad_norm = torch.nn.utils.clip_grad_norm_(params, 100 * args.grad_clip)",
     ["test_rules.py::test_rl_update_is_clipped_to_grad_clip"]),
    ("RL step: the update's gradient is clipped to --grad_clip [variant: SFT's 1.0]", "igpo.py",
     "grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)",
     "grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)",
     ["test_rules.py::test_rl_update_is_clipped_to_grad_clip"]),
    ("RL step: the update's gradient is clipped to --grad_clip [variant: clipped per micro-batch]", "igpo.py",
     "                (loss / len(micro)).backward()\n"
     "                stats += torch.tensor([loss.item(), kl.item(), clip_frac.item()]) / len(micro)\n"
     "            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)",
     "                (loss / len(micro)).backward()\n"
     "                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)\n"
     "                stats += torch.tensor([loss.item(), kl.item(), clip_frac.item()]) / len(micro)",
     ["test_rules.py::test_rl_update_is_clipped_to_grad_clip"]),
    ("Data order: a new permutation every epoch", "sft.py",
     "generator=torch.Generator().manual_seed(seed * 100003 + k // per_epoch)",
     "generator=torch.Generator().manual_seed(seed * 100003)",
     ["test_rules.py::test_every_epoch_draws_a_new_order_of_all_prompts"]),
    ("Data order: a new permutation every epoch [variant: a new permutation every batch]", "sft.py",
     "generator=torch.Generator().manual_seed(seed * 100003 + k // per_epoch)",
     "generator=torch.Generator().manual_seed(seed * 100003 + k % per_epoch)",
     ["test_rules.py::test_every_epoch_draws_a_new_order_of_all_prompts"]),
    ("Data order: a new permutation every epoch [variant: batch index not wrapped]", "sft.py",
     "perm[(k % per_epoch) * size:][:size]", "perm[k * size:][:size]",
     ["test_rules.py::test_every_epoch_draws_a_new_order_of_all_prompts"]),
    ("Non-finite updates are skipped (NOTES §3 item 8)", "igpo.py",
     "if finite:  # a non-finite update", "if True:  # a non-finite update",
     ["test_reliability.py::test_nonfinite_update_is_skipped_and_counted"]),
    ("Non-finite updates are skipped (NOTES §3 item 8) [variant: a skipped update's gradient kept]", "igpo.py",
     "                opt.step()\n            opt.zero_grad(set_to_none=True)",
     "                opt.step()\n                opt.zero_grad(set_to_none=True)",
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
    ("MetaMathQA selection (NOTES §3 item 11) [variant: GSM rows only]", "igpo.py",
     'METAMATH_TYPES = ("GSM_AnsAug", "MATH_AnsAug")', 'METAMATH_TYPES = ("GSM_AnsAug",)',
     ["test_llada.py::test_metamath_official_selection"]),
    ("RL prompts from a stream of their own (NOTES §3 item 18)", "igpo.py",
     'seed=f"rl-{args.seed}"', "seed=args.seed",
     ["test_igpo.py::test_rl_prompts_are_not_the_sft_problems"]),
    ("RL prompts from a stream of their own (NOTES §3 item 18) [variant: one stream whatever --seed]", "igpo.py",
     'seed=f"rl-{args.seed}"', 'seed="rl-0"',
     ["test_igpo.py::test_rl_prompts_are_not_the_sft_problems"]),
    ("LR schedule steps once per batch of rollouts (NOTES §3 item 13)", "igpo.py",
     "        sched.step()\n        step += 1", "        step += 1",
     ["test_rules.py::test_schedule_steps_once_per_batch_of_rollouts"]),
    ("LR schedule steps once per batch of rollouts (NOTES §3 item 13) [variant: once per update]", "igpo.py",
     "            skipped, bad = skipped + (not finite), sft.count_bad(bad, finite)\n        sched.step()\n",
     "            skipped, bad = skipped + (not finite), sft.count_bad(bad, finite)\n            sched.step()\n",
     ["test_rules.py::test_schedule_steps_once_per_batch_of_rollouts"]),
    ("LR schedule steps once per batch of rollouts (NOTES §3 item 13) [variant: warmup from lr 0]", "igpo.py",
     "min(1.0, (s + 1) / args.warmup_steps)", "min(1.0, s / args.warmup_steps)",
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
    ("Reward extraction: the last box wins (NOTES §3 item 21) [variant: the first <answer> tag]", "eval.py",
     'k = text.rfind("<answer>")', 'k = text.find("<answer>")',
     ["test_grader.py::test_extract_answer"]),
    ("Reward extraction: the last box wins (NOTES §3 item 21) [variant: the first ####]", "eval.py",
     'k = text.rfind("####")', 'k = text.find("####")',
     ["test_grader.py::test_extract_answer"]),
    ("Prompt format: the instruction, then the question, in one user turn (NOTES §3 item 23)", "sft.py",
     "content = question if toy else REASONING_PROMPT + question",
     "content = question if toy else question + REASONING_PROMPT",
     ["test_sft.py::test_prompt_format"]),
    ("Prompt format: the instruction, then the question, in one user turn (NOTES §3 item 23) [variant: the embedded "
     "task gets the instruction too]", "sft.py",
     "content = question if toy else REASONING_PROMPT + question", "content = REASONING_PROMPT + question",
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
    ("Precision: bf16 computes, trained weights stay fp32 (NOTES §7) [variant: no bf16 autocast]", "sft.py",
     "return dtype, (torch.bfloat16 if bf16 else None)", "return dtype, None",
     ["test_llada.py::test_bf16_policy_moves_weights_like_fp32"]),
    ("Precision: eval keeps a full fine-tuning checkpoint's fp32 weights (NOTES §7)", "eval.py",
     "frozen_base=not full)", "frozen_base=True)",
     ["test_llada.py::test_full_fine_tuning_checkpoint_is_evaluated_with_its_fp32_weights"]),
    ("Torchrun: each rank rolls out its own share of the step's prompts (NOTES §5)", "igpo.py",
     "[rank * B:(rank + 1) * B]", "[:B]",
     ["test_scale.py::test_each_rank_trains_its_share_and_the_average_is_the_whole_batch"]),
    ("Torchrun: a micro-batch's loss / this rank's micro-batches (NOTES §5)", "igpo.py",
     "(loss / len(micro)).backward()", "(loss / args.grad_accum).backward()",
     ["test_scale.py::test_each_rank_trains_its_share_and_the_average_is_the_whole_batch"]),
    ("Torchrun: each SFT rank trains its own micro-batches of the step (NOTES §5)", "sft.py",
     "k = step * args.grad_accum + micro * world + rank", "k = step * args.grad_accum + micro + rank",
     ["test_scale.py::test_each_sft_rank_trains_its_micro_batches_and_the_average_is_the_whole_step"]),
    ("Torchrun: an SFT micro-batch's loss / this rank's micro-batches (NOTES §5)", "sft.py",
     "loss = sft_loss(model, batch, facts, gen) / accum", "loss = sft_loss(model, batch, facts, gen) / args.grad_accum",
     ["test_scale.py::test_each_sft_rank_trains_its_micro_batches_and_the_average_is_the_whole_step"]),
    ("Measurements sample with the exact schedule, whatever the rollouts use (NOTES §3 item 25)", "igpo.py",
     "exact = sampler_of(args)._replace(temperature=0.0, batch=64, confidence_threshold=0.0)",
     "exact = sampler_of(args)._replace(temperature=0.0, batch=64)",
     ["test_igpo.py::test_measurements_use_the_exact_schedule_whatever_the_rollouts_use"]),
    ("Measurements sample with the exact schedule, whatever the rollouts use (NOTES §3 item 25) [variant: the "
     "held-out curve with the rollouts' threshold]", "igpo.py",
     'sampler._replace(confidence_threshold=0.0)', "sampler",
     ["test_igpo.py::test_measurements_use_the_exact_schedule_whatever_the_rollouts_use"]),
    ("Resume: a checkpoint saves the CUDA generator of a GPU run (NOTES §7)", "sft.py",
     'cuda = torch.cuda.get_rng_state() if gens[0].device.type == "cuda" else None', "cuda = None",
     ["test_reliability.py::test_checkpoint_saves_and_restores_the_cuda_generator"]),
    ("Resume: the CUDA generator's state is put back (NOTES §7)", "sft.py",
     "        torch.cuda.set_rng_state(rng[\"cuda\"])", "        pass",
     ["test_reliability.py::test_checkpoint_saves_and_restores_the_cuda_generator"]),
    ("Resume: the saved state is loaded onto the CPU (NOTES §7)", "sft.py",
     'torch.load(saved, map_location="cpu", weights_only=True)', "torch.load(saved, weights_only=True)",
     ["test_reliability.py::test_resume_loads_a_gpu_written_state_onto_the_cpu"]),
    # --confidence_threshold and --kv_cache (NOTES §3 item 25): each rule broken more than one way
    ("Threshold: commits every masked position >= tau (NOTES §3 item 25)", "eval.py",
     "k = ((block == mask_id) & (confidence >= tau)).sum(1).clamp(min=1)", "k = ((block == mask_id) & (confidence > tau)).sum(1).clamp(min=1)",
     ["test_sampler.py::test_threshold_commits_the_masked_positions_at_least_tau_and_never_a_hint"]),
    ("Threshold: hints and committed tokens are never counted", "eval.py",
     "k = ((block == mask_id) & (confidence >= tau)).sum(1).clamp(min=1)", "k = (confidence >= tau).sum(1).clamp(min=1)",
     ["test_sampler.py::test_threshold_commits_the_masked_positions_at_least_tau_and_never_a_hint"]),
    ("Threshold: at least one token a step", "eval.py",
     "k = ((block == mask_id) & (confidence >= tau)).sum(1).clamp(min=1)", "k = ((block == mask_id) & (confidence >= tau)).sum(1).clamp(min=0)",
     ["test_sampler.py::test_threshold_commits_the_masked_positions_at_least_tau_and_never_a_hint", "test_sampler.py::test_threshold_takes_one_token_a_step_when_nothing_is_confident"]),
    ("Threshold: counted per row", "eval.py",
     "k = ((block == mask_id) & (confidence >= tau)).sum(1).clamp(min=1)", "k = ((block == mask_id) & (confidence >= tau)).sum().clamp(min=1)",
     ["test_sampler.py::test_threshold_commits_the_masked_positions_at_least_tau_and_never_a_hint"]),
    ("Threshold: a block gets block_length steps", "eval.py",
     "for i in range(Lb if tau else steps):", "for i in range(Lb - 1 if tau else steps):",
     ["test_sampler.py::test_threshold_takes_one_token_a_step_when_nothing_is_confident"]),
    ("Threshold: a block gets block_length steps, not the schedule's", "eval.py",
     "for i in range(Lb if tau else steps):", "for i in range(steps):",
     ["test_sampler.py::test_threshold_takes_one_token_a_step_when_nothing_is_confident"]),
    ("Threshold: a row runs while its block holds a mask", "eval.py",
     "k = (x[:, s:e] == mask_id).any(1).long() if tau", "k = (x[:, s:e] == mask_id).all(1).long() if tau",
     ["test_sampler.py::test_threshold_commits_the_masked_positions_at_least_tau_and_never_a_hint"]),
    ("Threshold: tau = 0 is the exact schedule", "eval.py",
     "            if tau:  # Fast-dLLM", "            if tau is not None:  # Fast-dLLM",
     ["test_sampler.py::test_threshold_zero_is_the_exact_schedule_tokens_and_generator"]),
    ("KV cache: cut back to the prefix before s - shifted", "eval.py",
     "cache.crop(s - facts.shifted)", "cache.crop(s)",
     ["test_dream.py::test_kv_cache_feeds_the_exact_canvas_at_its_positions"]),
    ("KV cache: cut back after every forward", "eval.py",
     "cache.crop(s - facts.shifted)", "None",
     ["test_dream.py::test_kv_cache_feeds_the_exact_canvas_at_its_positions"]),
    ("KV cache: later steps feed the canvas from the cached prefix on", "eval.py",
     "x[rows, c:], s - c, e - c", "x[rows, c + 1:], s - c - 1, e - c - 1",
     ["test_dream.py::test_kv_cache_feeds_the_exact_canvas_at_its_positions"]),
    ("KV cache: the rows that stay keep their keys and values", "eval.py",
     "torch.isin(cache.rows, rows)", "torch.isin(rows, cache.rows)",
     ["test_dream.py::test_kv_cache_on_dream_with_hints_early_exit_and_threshold"]),
    ("KV cache: refused where sft.MODELS says the model cannot", "eval.py",
     "        if not facts.kv_cache:", "        if False:",
     ["test_llada.py::test_kv_cache_is_refused_with_one_line_on_llada_and_the_embedded_model"]),
    ("Model facts: LLaDA cannot cache", "sft.py",
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj"), False),',
     '"llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj"), True),',
     ["test_llada.py::test_kv_cache_is_refused_with_one_line_on_llada_and_the_embedded_model"]),
    ("Model facts: Dream can cache", "sft.py",
     '"up_proj", "down_proj"), True),', '"up_proj", "down_proj"), False),',
     ["test_dream.py::test_kv_cache_on_dream_with_hints_early_exit_and_threshold"]),
    ("No forward builds a KV cache unless --kv_cache asks (NOTES §7)", "sft.py",
     "    model.config.use_cache = False\n", "",
     ["test_dream.py::test_no_forward_builds_a_cache_without_kv_cache"]),
]


def stale(selected):
    """The mutants whose correct text no longer occurs exactly once in its file: a refactor changed the line,
    so the mutant would break nothing. Keeping this table in step with the code is this harness's job."""
    return [m for m in selected if open(os.path.join(ROOT, m[1])).read().count(m[2]) != 1 or m[2] == m[3]]


def copy_of_repo(tmp):
    copy = os.path.join(tmp, "repo")
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("out", ".git", "__pycache__", ".pytest_cache"))
    return copy


def pytest(copy, tests, marks=()):
    """Run the tests (file::name) in the copy; (passed, the first failing test's id or the error's last line).
    Nothing collected (exit status 5: --everyday deselected every listed test, all slow) counts as passed."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *marks,
                        *[os.path.join("tests", name) for name in tests]], cwd=copy, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    lines = (r.stdout + r.stderr).splitlines()
    failed = [l.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ") for l in lines
              if l.startswith(("FAILED ", "ERROR "))]
    return r.returncode in (0, 5), (failed or lines[-1:] or [""])[0]


def baseline(selected, marks=()):
    """The listed tests of the selected mutants on the unchanged repository: the failures (none expected)."""
    tests = sorted({t for m in selected for t in m[4]})
    with tempfile.TemporaryDirectory() as tmp:
        ok, first = pytest(copy_of_repo(tmp), tests, marks)
    return [] if ok else [first]


def run(selected, marks=()):
    results = []
    for rule, path, old, new, tests in selected:
        with tempfile.TemporaryDirectory() as tmp:
            copy = copy_of_repo(tmp)
            src = open(os.path.join(copy, path)).read()
            if src.count(old) != 1:
                results.append((rule, "NOT APPLIED (line not found once)", tests))
                continue
            open(os.path.join(copy, path), "w").write(src.replace(old, new))
            t = time.time()
            passed, first = pytest(copy, tests, marks)
            verdict = "MISSED" if passed else "caught"
            results.append((rule, f"{verdict} ({time.time() - t:.0f} s)", tests))
        print(f"{results[-1][1]:>24}  {rule}" + ("" if passed else f"  <- {first}"), flush=True)
    return results


VARIANT = " [variant: "


def change(old, new):
    """A mutant's change in a few words: the differing middle of its correct and broken texts, widened to whole
    words (runs of non-space characters) and balanced brackets, as `old` -> `new`."""
    a = 0
    while a < min(len(old), len(new)) and old[a] == new[a]:
        a += 1
    b = 0
    while b < min(len(old), len(new)) - a and old[-1 - b] == new[-1 - b]:
        b += 1
    word = lambda c: not c.isspace()
    while a > 0 and word(old[a - 1]):
        a -= 1
    while b > 0 and word(old[len(old) - b]):
        b -= 1
    depth = lambda text: sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")
    middle = lambda text: text[a:len(text) - b]
    while b > 0 and max(depth(middle(old)), depth(middle(new))) > 0:  # close what the middle opens ...
        b -= 1
    while a > 0 and min(depth(middle(old)), depth(middle(new))) < 0:  # ... and open what it closes
        a -= 1
    while a > 0 and word(old[a - 1]):
        a -= 1
    cut = lambda text: " ".join(middle(text).split()).replace("|", "\\|")
    return f"`{cut(old)}` -> `{cut(new)}`" if cut(new) else f"`{cut(old)}` removed"


def table(mutants):
    """NOTES.md §12's table: one row per rule, with every wrong version tried and the tests listed for them."""
    rules = {}
    for rule, path, old, new, tests in mutants:
        name, _, label = rule.partition(VARIANT)
        row = rules.setdefault(name, {"path": path, "tried": [], "tests": []})
        row["tried"].append(label[:-1] if label else change(old, new))
        row["tests"] += [t for t in tests if t not in row["tests"]]
    return [f"| {name} | `{r['path']}` | {'; '.join(r['tried'])} | {', '.join(f'`{t}`' for t in r['tests'])} |"
            for name, r in rules.items()]


if __name__ == "__main__":
    if "--table" in sys.argv:
        print("| rule | file | wrong versions tried (the first is the rule's own mutant) | tests that fail |")
        print("|---|---|---|---|")
        print("\n".join(table(MUTANTS)))
        sys.exit(0)
    # --everyday: the listed tests as the README's everyday command runs them (-m "not slow"): a mutant that only
    # a slow test catches is then MISSED, since the everyday command (which runs every fast test) would not see it
    marks = ["-m", "not slow"] if "--everyday" in sys.argv else []
    prefixes = [a for a in sys.argv[1:] if a != "--everyday"]
    chosen = [m for m in MUTANTS if not prefixes or any(m[0].startswith(p) for p in prefixes)]
    for rule, path, old, _, _ in stale(chosen):  # reported before anything runs, and counted as missed
        print(f"STALE: {rule}: the text below is not in {path} exactly once; update MUTANTS\n    {old!r}")
    broken = baseline(chosen, marks)
    if broken:
        sys.exit(f"the listed tests fail on the unchanged code ({broken[0]}): fix that first, no mutant was run")
    print(f"the listed tests pass on the unchanged code; {len(chosen)} mutants", flush=True)
    results = run(chosen, marks)
    missed = [r for r in results if not r[1].startswith("caught")]
    print(f"{len(results) - len(missed)} of {len(results)} mutants caught")
    sys.exit(1 if missed else 0)
