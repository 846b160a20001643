"""The diffusion sampler (with inpainting) and benchmark evaluation."""
# Run it:
#   python eval.py                                  # out/igpo (else out/sft) on the embedded test split
#   python eval.py --model out/sft --show --limit 1 # watch one canvas being denoised
#   paper scale, one GPU: the README's command (tests/test_llada.py checks that the two agree)
#   python eval.py --model out/igpo_llada --trust_remote_code --task math500 --gen_length 256 \
#       --block_length 32 --diffusion_steps 128
#   Dream-v0-Instruct-7B: the same with --model out/igpo_dream (README)
#   python eval.py --compare A/eval_toy.json B/eval_toy.json  # paired difference of two runs
#
# A masked diffusion LM writes its answer by starting from a canvas of mask tokens and, step by step,
# committing the tokens it is most confident about (LLaDA's low-confidence remasking, NOTES.md §4). The
# canvas is cut into blocks that are filled left to right (semi-autoregressive decoding); inside a block the
# order is free. Inpainting is the same loop started from a canvas where some positions already hold fixed
# tokens (hints). igpo.py uses generate() for rollouts and grade() as its reward, so RL and evaluation share
# one code path.
#
# Eq. (k) refers to the equations of NOTES.md §2. Deviations from the paper, with reasons, are NOTES.md §3;
# the ones in this file: Gumbel-max written as argmax(l + T g) (item 6), the mask token and ids the tokenizer
# cannot decode are never sampled (item 5), logits only where they are read (item 7), no padding ever enters
# the model (item 16), early exit (item 17), and two opt-in approximations, off by default (item 25):
#   python eval.py --confidence_threshold 0.9       # commit every masked position at least 0.9 confident
#   python eval.py --model out/igpo_dream --trust_remote_code --kv_cache ...  # Dream: prefix keys/values kept
import argparse
import ctypes
import json
import os
import re
import threading
import time
from fractions import Fraction
from typing import Callable, NamedTuple

import torch

from sft import (MODELS, autocast, equal_length_batches, fail, init_distributed, load_model, load_rows,
                 make_prompt, precision_line, precision_policy, rank_and_world, shared_flags, toy_dataset)

NEG_INF = float("-inf")
F64_CHUNK_BYTES = 16 * 2**20  # the sampler's float64 work is done this many bytes at a time (NOTES.md §7)
PROBE_QUESTIONS, PROBE_GATE = 64, 0.1  # sft.py's regime check: held-out problems, greedy accuracy gate


def get_args(argv=None):
    # allow_abbrev=False: a misspelled or removed flag is an error, not a prefix of another flag
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    # ---- model and task; --model defaults to out/igpo, else out/sft; --out_dir holds eval_<task>.json
    shared_flags(p, model="", out_dir="out", training=False)  # flags all three scripts share (sft.py)
    p.add_argument("--task", default="toy", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data", default="", help="local JSON/JSONL in the task's hub layout")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all; toy: 500)")
    # ---- sampler (NOTES.md §4)
    p.add_argument("--gen_length", type=int, default=0, help="L: tokens generated (toy: 48; paper: 256)")
    p.add_argument("--block_length", type=int, default=0, help="semi-autoregressive block (paper: 32)")
    p.add_argument("--diffusion_steps", type=int, default=0, help="denoising steps (default: L/2)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (paper: 0; AMC: 0.1)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per question, averaged (AMC: 16)")
    p.add_argument("--gen_batch", type=int, default=64, help="sequences per generate() call (memory)")
    p.add_argument("--early_exit", action=argparse.BooleanOptionalAction, default=True,
                   help="finished rows leave the sampler's batch (same tokens)")
    speed_flags(p)
    # ---- run
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired accuracy difference B - A of two "
                   "results JSONs on their shared questions; a,b,c averages several files (seeds) per side")
    p.add_argument("--grade", metavar="FILE", help="grade a saved results JSON (ours, or d1's generations) "
                   "again with --task's grader, no model: eval_<task>.json as an evaluation writes it")
    p.add_argument("--show", action="store_true", help="print the first canvas after every denoising step")
    return p.parse_args(argv)


def speed_flags(p):
    # The sampler's two opt-in approximations, for igpo.py and eval.py alike (NOTES.md §3 item 25, §8).
    p.add_argument("--confidence_threshold", type=float, default=0.0, help="tau: each step commits every "
                   "masked position at least this confident, and at least one (0: the paper's exact sampler)")
    p.add_argument("--kv_cache", action="store_true", help="keys/values of the prompt and finished blocks "
                   "computed once per block (models whose sft.MODELS entry allows it: Dream)")


# ----------------------------------------------------------------------------------------------------------
# The sampler (NOTES.md §4): LLaDA's semi-autoregressive low-confidence remasking, with the fixed hint
# tokens of Eq. (7) for inpainting.

class Sampler(NamedTuple):  # the sampler's settings, which always travel together
    gen_length: int  # L: answer positions
    block_length: int  # positions per semi-autoregressive block
    diffusion_steps: int  # denoising steps over the whole answer, split evenly over the blocks
    temperature: float  # of the Gumbel noise; 0 is greedy
    early_exit: bool = True  # rows whose answer has ended leave the batch (same tokens, NOTES.md §3 item 17)
    batch: int = 0  # rows per generate() call, a memory knob (0: all at once)
    confidence_threshold: float = 0.0  # tau > 0: commit by confidence, not by count (NOTES.md §3 item 25)
    kv_cache: bool = False  # reuse the prefix's keys and values within a block (NOTES.md §3 item 25)


def check_sampler(sampler):
    L, Lb, steps = sampler.gen_length, sampler.block_length, sampler.diffusion_steps
    if L <= 0 or Lb <= 0 or L % Lb:
        fail(f"gen_length ({L}) must be a positive multiple of block_length ({Lb})")
    if steps <= 0 or steps % (L // Lb):
        fail(f"steps ({steps}) must be a positive multiple of the number of blocks ({L // Lb})")
    if sampler.temperature < 0:
        fail(f"temperature must be >= 0 (got {sampler.temperature}); 0 is greedy")
    if not 0 <= sampler.confidence_threshold <= 1:
        fail(f"confidence_threshold must be in [0, 1] (got {sampler.confidence_threshold}); 0 is exact")


def num_transfer_tokens(mask_index, steps):
    # How many tokens each row unmasks at each step of a block: the n masked positions spread as evenly as
    # possible over the steps, the remainder going to the first steps. (B, Lb) bool -> (B, steps) long.
    n = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, rem = n // steps, n % steps
    return base + (torch.arange(steps, device=mask_index.device) < rem).long()  # (B, steps)


def completion_mask(completions, end_ids):
    # (N, L) bool: positions up to and including the first end token (end of turn or padding). The loss
    # stops there (NOTES.md §3 item 2), so does grade(), and the early-exit sampler pads what follows.
    is_end = torch.isin(completions, torch.as_tensor(end_ids, device=completions.device))  # (N, L)
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # strictly after the first end token
    return ~after_end


def logits_at(model, x, start, end, shifted=False, cache=None):
    # model(x).logits[:, start:end], without computing the rest. The vocabulary projection is applied position
    # by position, so feeding it only the hidden states we will read gives the same numbers; at LLaDA's 126k
    # vocabulary that projection's output is the largest tensor of the forward pass. A forward pre-hook on the
    # output embedding slices its input; a model without get_output_embeddings() is sliced afterwards.
    # shifted (Dream): the logits at position i - 1 predict token i, so the window moves one to the left.
    # cache (--kv_cache): the keys and values of the positions before x, to which the forward appends x's own.
    start, end = start - shifted, end - shifted
    kwargs = {} if cache is None else {"past_key_values": cache, "use_cache": True}
    head = getattr(model, "module", model).get_output_embeddings()
    if head is None:
        return model(x, **kwargs).logits[:, start:end]
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, start:end],) + tuple(args[1:]))
    try:
        return model(x, **kwargs).logits
    finally:
        handle.remove()


def block_logits(model, x, rows, s, e, facts, cache=None):
    # The logits (R, Lb, V) of the block s:e for the R rows `rows` of the canvas x. Exact (no cache): one
    # forward over the whole canvas. With a cache (--kv_cache, NOTES.md §3 item 25) a block's first forward is
    # still the whole canvas, and leaves every position's keys and values in the cache; it is cut back to the
    # prefix, the positions before s - shifted (Dream reads token s off position s - 1, so that one is fed).
    # Later steps feed the canvas from there on, at its own positions, against the prefix as it was at the
    # block's first step: the approximation, as with bidirectional attention the prefix sees the block change
    c = cache.get_seq_length() if cache is not None else 0  # canvas positions whose keys and values are held
    if c:  # rows only leave the batch within a block (k never grows): the cache keeps the ones that stay
        cache.batch_select_indices(torch.isin(cache.rows, rows).nonzero().flatten())
    logits = logits_at(model, x[rows, c:], s - c, e - c, facts.shifted, cache)
    if cache is not None:
        cache.crop(s - facts.shifted)  # the forward appended the fed positions: back to the prefix
        cache.rows = rows  # the canvas rows the cache holds, in order
    return logits


def logits_size(model):
    # The logits' last dimension, read off the output layer without a forward pass.
    m = getattr(model, "module", model)
    head = m.get_output_embeddings()
    return head.weight.shape[0] if head is not None else m.config.vocab_size


def sample_tokens(logits, rows, n_rows, temperature, generator=None):
    # Draw x0 by Gumbel-max at temperature T and return it with the model's probability of it (its
    # confidence), for the R rows `rows` of a batch of n_rows. logits (R, Lb, V) -> x0, confidence (R, Lb).
    # float64 (low precision makes the Gumbel noise coarse, which hurts quality), a few rows at a time: the
    # step's peak memory is its logits plus one chunk's float64 work, not a float64 copy of everything.
    # Every one of the n_rows rows draws its noise in turn, whether it runs or not, so a row's draws do not
    # depend on which other rows take this step (early exit stays exact).
    R, Lb, V = logits.shape
    chunk = max(1, F64_CHUNK_BYTES // (Lb * V * 8))  # rows per chunk
    x0 = torch.empty(R, Lb, dtype=torch.long, device=logits.device)
    confidence = torch.empty(R, Lb, dtype=torch.float64, device=logits.device)
    for a in range(0, n_rows, chunk):
        b = min(a + chunk, n_rows)
        u = None
        if temperature > 0:
            u = torch.rand((b - a, Lb, V), dtype=torch.float64, device=logits.device, generator=generator)
        here = ((rows >= a) & (rows < b)).nonzero().flatten()  # which of the R rows fall in rows a..b-1
        if not len(here):
            continue
        l = logits[here].double()  # (r, Lb, V)
        # Gumbel-max: argmax(l + T g) with g = -log(-log u) standard Gumbel is a draw from softmax(l / T);
        # computed in place in the noise buffer, which holds l + T g at the end
        if u is not None:
            x0[here] = u[rows[here] - a].log_().neg_().log_().mul_(-temperature).add_(l).argmax(-1)
        else:
            x0[here] = l.argmax(-1)
        log_p = l.gather(-1, x0[here, :, None]).squeeze(-1) - l.logsumexp(-1)  # log softmax at x0, (r, Lb)
        confidence[here] = log_p.exp()
    return x0, confidence


def rows_to_run(x, k, P, s, end_ids):
    # Early exit (NOTES.md §3 item 17), the one place it enters the loop: the rows whose forward pass at this
    # step matters. k (B,) tokens each row commits now; a row with none to commit would change nothing, and a
    # row with an end token in a completed block (positions P..s-1) is finished. end_ids None: no early exit.
    run = k > 0
    if end_ids is not None:
        run &= ~torch.isin(x[:, P:s], end_ids).any(1)
    return run.nonzero().flatten()  # (R,)


def commit(block, x0, confidence, k, mask_id):
    # Unmask the k most confident masked positions of each row of a block (LLaDA's low-confidence remasking).
    # block, x0, confidence (R, Lb); k (R,). Positions already committed, and hint tokens, are not candidates.
    confidence = torch.where(block == mask_id, confidence, NEG_INF)
    kmax = int(k.max()) if len(k) else 0
    top = confidence.topk(kmax, dim=1).indices  # (R, kmax): take the largest k over the rows ...
    keep = torch.arange(kmax, device=block.device) < k[:, None]  # ... and keep the first k of each row
    transfer = torch.zeros_like(block, dtype=torch.bool).scatter_(1, top, keep)  # (R, Lb)
    return torch.where(transfer, x0, block)


@torch.no_grad()
def generate(model, prompt_ids, sampler, facts, hints=None, generator=None, show=None):
    # Fill sampler.gen_length masked positions after each prompt. prompt_ids (B, P): prompts of one length,
    # unpadded (callers group them with equal_length_batches: no model here ever sees a pad token).
    # hints (B, L) for inpainting: a token id where the answer is fixed in advance, the mask elsewhere.
    # Returns (B, P + L). `show` (a tokenizer) prints the first canvas after every step.
    check_sampler(sampler)
    if sampler.kv_cache:
        if not facts.kv_cache:  # sft.MODELS says which models can (NOTES.md §3 item 25)
            fail("--kv_cache needs a model that can reuse a prefix's keys and values (in sft.MODELS: Dream); "
                 "LLaDA's hub code refuses any cache, the embedded model has none")
        from transformers import DynamicCache
    B, P = prompt_ids.shape
    L, Lb, mask_id = sampler.gen_length, sampler.block_length, facts.mask_id
    tau = sampler.confidence_threshold  # 0: the exact schedule
    x = torch.full((B, P + L), mask_id, dtype=torch.long, device=prompt_ids.device)  # (B, P + L)
    x[:, :P] = prompt_ids
    if hints is not None:  # inpainting enters here: the canvas starts with the hint tokens in place
        x[:, P:] = hints
    end_ids = torch.tensor(facts.end_ids, device=x.device) if sampler.early_exit else None
    V = logits_size(model)
    n_blocks = L // Lb
    steps = sampler.diffusion_steps // n_blocks  # per block
    for b in range(n_blocks):
        s, e = P + b * Lb, P + (b + 1) * Lb
        # the schedule counts mask tokens only: hint tokens are never scheduled and never change (Eq. (7);
        # after a row's first end token, early exit pads the tail below, hints there included)
        n_transfer = num_transfer_tokens(x[:, s:e] == mask_id, steps)  # (B, steps)
        cache = DynamicCache() if sampler.kv_cache else None  # filled by the block's first forward
        # tau > 0 commits at least one token a step, so Lb steps end any block; the count stays fixed (steps
        # with nothing left to commit draw their noise and skip the forward) so that early exit stays exact
        for i in range(Lb if tau else steps):
            # the tokens each row commits: the schedule's count, or with tau one at least while the block
            # holds a mask (the final count needs this step's confidences)
            k = (x[:, s:e] == mask_id).any(1).long() if tau else n_transfer[:, i]  # (B,)
            rows = rows_to_run(x, k, P, s, end_ids)  # (R,)
            if len(rows):
                logits = block_logits(model, x, rows, s, e, facts, cache)  # (R, Lb, V): this block only
            else:
                logits = torch.empty(0, Lb, V, device=x.device)  # nothing to commit: no forward pass
            logits[..., mask_id] = NEG_INF  # never "unmask" a position into the mask token
            logits[..., facts.n_tokens:] = NEG_INF  # nor into an id the tokenizer cannot decode
            x0, confidence = sample_tokens(logits, rows, B, sampler.temperature, generator)
            block, k = x[rows, s:e], k[rows]  # (R, Lb), (R,)
            if tau:  # Fast-dLLM's parallel decoding: each masked position at least tau confident, >= 1
                k = ((block == mask_id) & (confidence >= tau)).sum(1).clamp(min=1)
            x[rows, s:e] = commit(block, x0, confidence, k, mask_id)
            if show is not None:
                hint_row = None if hints is None else hints[0]
                print_canvas(show, x[0, P:], hint_row, mask_id, f"block {b} step {i}")
    if end_ids is not None:  # the tail after each row's first end token: padding, as SFT taught (d1's layout)
        x[:, P:] = x[:, P:].masked_fill(~completion_mask(x[:, P:], end_ids), end_ids[-1])
    return x


def print_canvas(tokenizer, answer_ids, hints, mask_id, title):
    # One line per denoising step: '_' for a mask, hint tokens underlined.
    out = []
    for j, t in enumerate(answer_ids.tolist()):
        c = "_" if t == mask_id else tokenizer.decode([t]).replace("\n", "⏎")
        if len(c) > 1 and c.startswith("<|"):
            c = "·"  # end-of-turn and padding shown as a dot
        out.append(f"\033[4m{c}\033[0m" if hints is not None and hints[j] != mask_id else c)
    print(f"{title:>16} | {''.join(out)}")
# ----------------------------------------------------------------------------------------------------------
# Grading (NOTES.md §6): one path for the RL reward and for benchmark accuracy. Every public function is
# total: any input gives an answer within a bounded time (2 s of CPU, 20 s wall at worst), nothing escapes.

_SPECIAL = re.compile(r"<\|[^<>|]{0,64}\|>")  # <|eot_id|>, <|mdm_mask|>, <|start_header_id|>, ...
# a completion ends at the first end token of any model in sft.MODELS (<|eot_id|>, <|im_end|>, <|endoftext|>)
END_TOKENS = re.compile("|".join(sorted({re.escape(t) for _, ends, *_ in MODELS.values() for t in ends})))
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed +([^\s${}][^$\n]*)")  # "\boxed 5$" (no braces)
_NUM = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")  # 1,000 / 18.00 / .5
_POW = re.compile(r"\^|\*\*")


def strip_special(text) -> str:
    return _SPECIAL.sub("", "" if text is None else str(text))


def extract_answer(text):
    # Last \\boxed{..} (or \\fbox, bare \\boxed x), else last <answer>..</answer>, else '#### x', in the text
    # before the first end token: the loss stops there too (completion_mask), so reward and loss read the same
    # tokens. Real LLaDA generations put nothing but EOS after their <|eot_id|> (tests/test_grader.py).
    text = strip_special(END_TOKENS.split("" if text is None else str(text), 1)[0])
    opens = {m.end() - 1: m.start() for m in _BOX.finditer(text)}  # brace index -> box start
    spans, stack = [], []  # (box start, content start, content end); slice only at the end
    for i, ch in enumerate(text):  # one linear pass, no recursion: nesting depth is harmless
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            j = stack.pop()
            if j in opens:
                spans.append((opens[j], j + 1, i))
    spans += [(m.start(1), m.start(1), m.end(1)) for m in _BOX_BARE.finditer(text)]
    for _, a, b in sorted(spans, reverse=True):  # rfind semantics: the box starting last wins
        if text[a:b].strip():
            return text[a:b].strip()
    k = text.rfind("<answer>")  # an unclosed final <answer> still counts: generations get cut off
    body = text[k + 8:].split("</answer>")[0].strip() if k >= 0 else ""
    k = text.rfind("####")
    return body or (text[k + 4:].strip().split("\n")[0].strip() if k >= 0 else "") or None


def answer_from_trace(trace):
    # A trace's final answer, where the data has no answer column: its last box (extract_answer), else
    # MetaMathQA's closing 'The answer is: X'. igpo.py's gold answers and sft.py's rewrite filter read it.
    boxed = extract_answer(trace)
    if boxed is not None:
        return boxed
    m = re.search(r"The answer is:?\s*(.+?)\s*$", trace.strip())
    return m.group(1) if m else None


def _to_number(s):
    # Exact Fraction from '18', '$1,000.', '18 \\text{dollars}', 'x = 3/4', '\\frac{7}{2}'; else None.
    s = repr(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else s
    s = re.sub(r"\\[a-z]*frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s.replace("{,}", ","))
    s = s.split("=")[-1].replace("\\$", "").replace("$", "").strip()  # "5 \times 3 = 15" -> 15
    m = re.fullmatch(r"(-?\d{1,15})\s*/\s*(\d{1,15})", s)
    if m and int(m.group(2)):
        return Fraction(int(m.group(1)), int(m.group(2)))
    if re.fullmatch(r"-?\d+(?:\.\d+)?e[+-]?\d{1,3}", s):  # a float gold such as 1e+20
        return Fraction(s)
    nums = _NUM.findall(s)  # units and words around the number are ignored; the last number wins
    return Fraction(nums[-1].replace(",", "")) if nums and len(nums[-1]) <= 40 else None


def _norm(s):
    # Cheap canonical form for an exact string match before any sympy work.
    s = re.sub(r"\\(?:left|right|!|,|;|:|\$)|\$|\s|\^\{?\\circ\}?|\\?%", "", s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s.replace("dfrac", "frac").replace("tfrac", "frac"))
    return re.sub(r"^[a-zA-Z]\w?=", "", s).rstrip(".")  # "x=5." -> "5"


def _too_hard(s):
    # True if sympy might do uninterruptible C big-int work (or deep recursion) on s.
    # The deadline in _latex_equal cannot stop C code, so such inputs must never reach sympy.
    if len(s) > 400 or re.search(r"\d{50}|(?:\d{4}|[)}\]])\s*!", s):
        return True  # giant literals; factorial of a big or compound argument
    if ("binom" in s or "choose" in s) and re.search(r"\^|\d{5}", s):
        return True
    depth = 0
    for ch in s:
        depth = max(0, depth + (ch in "{([") - (ch in "})]"))
        if depth > 12:
            return True
    for m in _POW.finditer(s):
        rest = s[m.end():].lstrip()
        exp = rest[:rest.find("}") + 1] if rest.startswith("{") else re.match(r"\d*.?", rest).group()
        base, depth, j = "", 0, m.start() - 1  # a bracketed base just before the power, if any
        while j >= 0 and s[m.start() - 1] in ")]}":
            depth += (s[j] in ")]}") - (s[j] in "([{")
            if depth <= 0:
                base = s[j:m.start()]
                break
            j -= 1
        # towers (9^9^9, 10^{10^{10}}, (2^9)^9) and exponents >= 1000 blow up in C
        if _POW.search(exp + base) or _POW.match(rest[len(exp):].lstrip()) or re.search(r"\d{4}", exp):
            return True
    return False


class _Deadline(BaseException):  # BaseException so math_verify's `except Exception` cannot eat it
    pass


_WARM = []  # math_verify imports sympy and its LaTeX parser lazily, on the first parse


def _latex_equal(pred, gold, seconds=2.0):
    # math_verify's own timeouts use SIGALRM: main thread only, and they would clobber a caller's
    # alarm. So they are off (None) and sympy runs in a helper thread that we watch; once it has used
    # `seconds` of CPU time we raise _Deadline inside it (delivered at its next bytecode) and answer
    # False. CPU time, not wall time: on a busy machine a wall-clock deadline would grade a correct but
    # starved answer wrong. A wall-clock cap of 10x `seconds` still bounds the call from any thread.
    from math_verify import parse, verify
    if not _WARM:  # the lazy imports are paid once, outside the deadline
        verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)
        _WARM.append(True)
    result, clock = [], []

    def work():
        try:
            has_clock = hasattr(time, "pthread_getcpuclockid")
            clock.append(time.pthread_getcpuclockid(threading.get_ident()) if has_clock else None)
            g, p = parse(f"${gold}$", parsing_timeout=None), parse(f"${pred}$", parsing_timeout=None)
            result.append(bool(g and p and verify(g, p, timeout_seconds=None)))
        except BaseException:
            pass

    def cpu_used(wall):
        try:  # the thread's own CPU clock; where there is none, wall time
            return time.clock_gettime(clock[0]) if clock and clock[0] is not None else wall
        except OSError:  # the thread has just finished
            return 0.0

    worker = threading.Thread(target=work, daemon=True)
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(0.01)
        wall = time.monotonic() - start
        if worker.is_alive() and (cpu_used(wall) > seconds or wall > 10 * seconds):
            thread_id, error = ctypes.c_ulong(worker.ident), ctypes.py_object(_Deadline)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, error)
            break
    return bool(result and result[0])


def grade(text, ground_truth, task) -> bool:
    # Is the final answer of `text` the gold one? The task picks the comparison (TASKS[task].grader).
    if task not in TASKS:
        raise ValueError(f"grade: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    try:
        pred = extract_answer(text)
        if pred is None or len(pred) > 1000:  # no real final answer is longer; keeps regexes linear
            return False
        if TASKS[task].grader == "numeric":  # exact rationals, relative tolerance 1e-6 for rounded decimals
            a, b = _to_number(pred), _to_number(ground_truth)
            return a is not None and b is not None and abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))
        gold = strip_special(ground_truth).strip()[:1000]
        if _norm(gold) and _norm(pred) == _norm(gold):
            return True
        pred, gold = pred.replace("\\$", "").replace("$", ""), gold.replace("\\$", "").replace("$", "")
        return not _too_hard(pred) and not _too_hard(gold) and _latex_equal(pred, gold)
    except Exception:  # malformed input of any kind is simply "not correct"
        return False


def same_answer(text, reference) -> bool:
    # sft.py's rewrite filter: does `text` end in the final answer of the trace `reference`? Graded as igpo.py
    # rewards real data (the math500 grader), against the answer igpo.py reads off a trace.
    gold = answer_from_trace(reference)
    return gold is not None and grade(text, gold, "math500")


# ----------------------------------------------------------------------------------------------------------
# Benchmarks: each task is registered in one place, TASKS, and reads the hub layout (sft.load_rows) or the
# same layout from a local --data file. To add one, add an entry to TASKS.

def gsm8k_gold(answer):
    return answer.split("####")[-1].strip().replace(",", "")


class Task(NamedTuple):
    hub_id: str  # the dataset on the hub ("" for the embedded task, generated in sft.py)
    config: str | None  # its configuration name, if any
    split: str
    question_col: str
    answer_col: str
    gold: Callable  # the answer column's value (a string) -> the gold answer
    grader: str  # "numeric": numbers compared exactly; "latex": math-verify equivalence (NOTES.md §6)
    gen_length: int  # default L
    block_length: int  # default block
    limit: int = 0  # default number of questions (0: all)


TASKS = {
    "toy": Task("", None, "test", "question", "answer", str, "numeric", 48, 8, 500),
    "gsm8k": Task("openai/gsm8k", "main", "test", "question", "answer", gsm8k_gold, "numeric", 256, 32),
    "math500": Task("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", str, "latex", 256, 32),
    "amc": Task("AI-MO/aimo-validation-amc", None, "train", "problem", "answer", str, "latex", 256, 32),
    "minerva": Task("math-ai/minervamath", None, "test", "question", "answer", str, "latex", 256, 32),
}


def load_task(task, data="", limit=0):
    # [(question, gold answer)] of a registered task; main() checks the task name, once.
    spec = TASKS[task]
    limit = limit or spec.limit
    if task == "toy":
        ds = toy_dataset("test", limit, seed=0)
    else:
        ds = load_rows(data or spec.hub_id, spec.split, [spec.question_col, spec.answer_col], spec.config)
    items = [(q, spec.gold(str(a))) for q, a in zip(ds[spec.question_col], ds[spec.answer_col])]
    return items[:limit] if limit else items


def evaluate(model, tokenizer, facts, items, task, sampler, num_samples=1, generator=None):
    # Generate num_samples answers per question and grade them. Returns (records, accuracy). Under torchrun
    # each rank takes every world-th question and the records are gathered back into the original order.
    from tqdm import tqdm
    rank, world = rank_and_world()
    all_items, items = items, items[rank::world]
    device = next(model.parameters()).device
    prompts = [tokenizer(make_prompt(tokenizer, q, task == "toy"), add_special_tokens=False).input_ids
               for q, _ in items for _ in range(num_samples)]
    texts = [None] * len(prompts)
    was_training = model.training
    model.eval()
    batches = equal_length_batches(map(len, prompts), sampler.batch or len(prompts))
    for rows in tqdm(batches, desc=f"eval {task}", disable=rank or None):
        ids = torch.tensor([prompts[i] for i in rows], device=device)  # (b, P): no padding, batch-invariant
        out = generate(model, ids, sampler, facts, generator=generator)
        for i, text in zip(rows, tokenizer.batch_decode(out[:, ids.shape[1]:])):
            texts[i] = text
    model.train(was_training)
    records = []
    for j, (q, gold) in enumerate(items):
        gens = texts[j * num_samples:(j + 1) * num_samples]
        correct = [grade(g, gold, task) for g in gens]
        records.append({"question": q, "generations": gens[0] if num_samples == 1 else gens,
                        "ground_truth": gold, "correct": sum(correct) / num_samples})
    if world > 1:
        shards = [None] * world
        torch.distributed.all_gather_object(shards, records)
        records = [shards[j % world][j // world] for j in range(len(all_items))]
    return records, sum(r["correct"] for r in records) / max(1, len(records))


def regime_check(model, tokenizer, facts, gen_length):
    # sft.py's stopping measure (NOTES.md §3 item 20): the fraction of PROBE_QUESTIONS held-out training
    # problems (neither SFT's nor RL's) whose G = 8 samples at the rollout temperature 1.2 are all wrong, the
    # all-wrong groups of Eq. (4), sampled as igpo.py samples them. Greedy accuracy first: below PROBE_GATE
    # the policy is far from the regime and the sampling is skipped (returns 1).
    ds = toy_dataset("train", PROBE_QUESTIONS, seed="probe")
    items = list(zip(ds["question"], ds["answer"]))
    greedy = Sampler(gen_length, 8, gen_length // 2, 0.0)  # igpo.py's defaults for the embedded task
    if evaluate(model, tokenizer, facts, items, "toy", greedy)[1] < PROBE_GATE:
        return 1.0
    gen = torch.Generator(next(model.parameters()).device).manual_seed(0)  # the same draws at every check
    records, _ = evaluate(model, tokenizer, facts, items, "toy", greedy._replace(temperature=1.2), 8, gen)
    return sum(r["correct"] == 0 for r in records) / len(records)


def write_json(path, obj):
    # Write via a temporary file and rename, so an interrupted run never leaves a half-written result.
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def compare(paths_a, paths_b, n_boot=4000, seed=0):
    # Paired comparison of two methods on the questions their results files share. Each side may be several
    # files (e.g. 3 seeds), averaged per question. The accuracy difference B - A gets a 95% paired-bootstrap
    # interval: questions are resampled together for both sides, so what makes a question hard cancels out,
    # which makes the interval much narrower than two separate error bars would suggest.
    def per_question(paths):
        runs = [{r["question"]: float(r["correct"]) for r in read_records(p)} for p in paths]
        return {q: sum(run[q] for run in runs) / len(runs) for q in set.intersection(*map(set, runs))}

    a, b = per_question(paths_a), per_question(paths_b)
    questions = sorted(set(a) & set(b))
    if not questions:
        fail("the two sides have no question in common")
    d = torch.tensor([b[q] - a[q] for q in questions], dtype=torch.float64)  # (n,) paired differences
    boot_gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (n_boot, len(d)), generator=boot_gen)  # (n_boot, n) resampled questions
    lo, hi = torch.quantile(d[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    acc_a, acc_b = sum(a[q] for q in questions) / len(d), sum(b[q] for q in questions) / len(d)
    return {"n": len(d), "acc_a": acc_a, "acc_b": acc_b, "diff": d.mean().item(), "ci95": [lo, hi]}


def regrade(path, task):
    # The records of a saved results file (ours, or d1's: question, generations, ground_truth), each of its
    # generations graded again, and the file's other fields (its settings), plus where they came from.
    if not os.path.exists(path):
        fail(f"results file not found: {path}")
    try:
        data = json.load(open(path))
        records = data["generations"]
        for r in records:  # one generation (d1's layout, ours at --num_samples 1) or a list of them
            gens = r["generations"] if isinstance(r["generations"], list) else [r["generations"]]
            r["correct"] = sum(grade(g, str(r["ground_truth"]), task) for g in gens) / len(gens)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        fail(f"{path} is not a results file with generations and ground_truth ({type(e).__name__}: {e})")
    settings = {k: v for k, v in data.items() if k not in ("generations", "metrics")}
    return records, {**settings, "graded": path}


def save_results(path, task, records, settings):
    # The results JSON (per-question records, the settings that made them, the metrics), and its printed line.
    correct = sum(r["correct"] for r in records)
    metrics = {"accuracy": correct / max(1, len(records)), "correct": correct, "total": len(records),
               "task": task}
    write_json(path, {"generations": records, **settings, "metrics": metrics})
    print(f"{task}: accuracy {100 * metrics['accuracy']:.1f}% ({correct:g}/{len(records)}) -> {path}")


def read_records(path):
    # The records of a results file, checked for the fields compare() reads.
    if not os.path.exists(path):
        fail(f"results file not found: {path}")
    try:
        records = json.load(open(path))["generations"]
        for r in records:  # touch every field compare() uses, so a bad file fails here with one line
            r["question"], float(r["correct"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        fail(f"{path} is not a results file with question/correct fields ({type(e).__name__}: {e})")
    return records


def main(argv=None):
    args = get_args(argv)
    if args.compare:  # paired comparison of saved results, no model needed
        r = compare(args.compare[0].split(","), args.compare[1].split(","))
        lo, hi = 100 * r["ci95"][0], 100 * r["ci95"][1]
        print(f"B - A = {100 * r['diff']:+.1f} points, 95% paired-bootstrap interval [{lo:+.1f}, {hi:+.1f}] "
              f"on {r['n']} questions (A {100 * r['acc_a']:.1f}%, B {100 * r['acc_b']:.1f}%)")
        return r
    if args.task not in TASKS:
        fail(f"unknown task '{args.task}' (choose from {', '.join(TASKS)})")
    task = TASKS[args.task]
    gen_length = args.gen_length or task.gen_length
    block_length = args.block_length or min(task.block_length, gen_length)
    steps = args.diffusion_steps or gen_length // 2
    sampler = Sampler(gen_length, block_length, steps, args.temperature, args.early_exit, args.gen_batch,
                      args.confidence_threshold, args.kv_cache)
    out = os.path.join(args.out_dir, f"eval_{args.task}.json")
    if args.grade:  # a saved results file graded again: no model, the sampler's flags unread
        if os.path.realpath(args.grade) == os.path.realpath(out):  # the original grades are kept
            fail(f"--grade {args.grade} would be overwritten by its regrading: pass another --out_dir")
        return save_results(out, args.task, *regrade(args.grade, args.task))
    check_sampler(sampler)
    model_path = args.model or next((p for p in ("out/igpo", "out/sft") if os.path.isdir(p)), None)
    if model_path is None:
        fail("no model given and neither out/igpo nor out/sft exists; run `python sft.py` first")
    rank, world, device = init_distributed(args.device)  # under torchrun, questions are split over ranks
    items = load_task(args.task, args.data, args.limit)
    # Evaluated as trained: a full fine-tuning checkpoint of these scripts (args.json, no LoRA) keeps its
    # fp32 weights, which bf16 storage would round (NOTES.md §7); frozen ones (hub model, LoRA base) are bf16
    saved = os.path.join(model_path, "args.json")
    full = os.path.exists(saved) and not json.load(open(saved)).get("lora_r")
    dtype, amp_dtype = precision_policy(args.precision, device, frozen_base=not full)
    model, tokenizer, facts = load_model(model_path, args.trust_remote_code, device, dtype)
    print(f"evaluating {model_path} on {args.task}: {len(items)} questions x {args.num_samples} samples, "
          f"L={gen_length} block={block_length} steps={steps} T={args.temperature} | "
          + precision_line(model, amp_dtype))
    gen = torch.Generator(device).manual_seed(args.seed + rank)
    t0 = time.time()
    with autocast(device, amp_dtype):
        if args.show:  # watch the first question's canvas being denoised, step by step
            first = make_prompt(tokenizer, items[0][0], args.task == "toy")
            first = torch.tensor([tokenizer(first, add_special_tokens=False).input_ids], device=device)
            generate(model.eval(), first, sampler, facts, generator=gen, show=tokenizer)
        records, _ = evaluate(model, tokenizer, facts, items, args.task, sampler, args.num_samples, gen)
    if rank:
        return
    settings = {"model_path": model_path, **sampler._asdict(), "seed": args.seed,
                "num_samples": args.num_samples, "seconds": round(time.time() - t0, 1)}
    save_results(out, args.task, records, settings)


if __name__ == "__main__":
    main()
