"""Length-aligned supervised fine-tuning (SFT) of a masked diffusion language model."""
# Run it:
#   python sft.py                                   # embedded model + task, a few CPU minutes -> out/sft
#   python sft.py --trace_col verbose --gen_length 256 --out_dir out/sft_verbose   # the long-trace ablation
#   paper scale, one GPU: the README's command (tests/test_llada.py checks that the two agree)
#   python sft.py --model GSAI-ML/LLaDA-8B-Instruct --trust_remote_code --dataset open-r1/OpenR1-Math-220k \
#       --question_col problem --trace_col solution --rewrite_model Qwen/Qwen2.5-7B-Instruct \
#       --gen_length 256 --lora_r 128 --grad_ckpt --batch_size 1 --grad_accum 64 --lr 1e-5 --warmup_steps 50 \
#       --max_steps 2000 --out_dir out/sft_llada
#   Dream-v0-Instruct-7B: the same with --model Dream-org/Dream-v0-Instruct-7B, --out_dir out/sft_dream
#
# Stage 1 of the IGPO recipe (NOTES.md §1), in two parts. With --rewrite_model, long traces are first
# rewritten concisely by an instruct LM (rewrite_traces). Then the model learns to *denoise* them: the prompt
# stays clean, every response token is replaced by the mask token with probability t, and the model predicts
# the originals (Eq. (2)). Each response is padded with EOS to exactly the generation length that RL and
# evaluation use, so what SFT teaches ("write a trace, then stop") is what the sampler later does.
#
# This file also holds what the three scripts share: the embedded world (a word-level tokenizer, a tiny
# bidirectional transformer, arithmetic word problems with ground-truth traces), the table of facts that
# differ between masked diffusion LMs (MODELS), model loading, and the run machinery (checkpoints, resume).
#
# Eq. (k) refers to the equations of NOTES.md §2 (the project's numbering, not the paper's).
# Deviations from the paper, with reasons, are NOTES.md §3; the ones in this file:
# - the embedded task's concise traces are generated, not rewritten by a large model (§3 item 9);
# - traces longer than the generation length are dropped with a printed count, never truncated: a truncated
#   trace would teach the model to stop mid-reasoning.
import argparse
import atexit
import json
import math
import os
import random
import shutil
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist
from tqdm import tqdm

# Special tokens, spelled as in LLaDA-8B-Instruct so that one code path serves both models.
EOS, BOS, MASK, EOT, UNK = "<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|unk|>"
SPECIAL_TOKENS = [EOS, BOS, MASK, "<|start_header_id|>", "<|end_header_id|>", EOT, UNK]  # ids 0..6, in order
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Real data: the question follows this format instruction in the user turn (the embedded task: bare question).
REASONING_PROMPT = ("Respond in the following format:\n<reasoning>\n...\n</reasoning>\n"
                    "<answer>\n...\n</answer>\nPut the final answer in \\boxed{}.\n\n")
LOG_EPS = 1e-3  # Eq. (1): mask probability p = (1 - eps) t + eps keeps p away from 0
MAX_BAD_UPDATES = 3  # consecutive non-finite updates skipped before a run (SFT or RL) stops
# The regime check of the embedded SFT (NOTES.md §3 item 20, eval.regime_check): every STOP_EVERY steps from
# STOP_FROM on, the policy is sampled on held-out problems as RL will sample it (T = 1.2, G = 8).
STOP_FROM, STOP_EVERY = 500, 100


def get_args(argv=None):
    # allow_abbrev=False: a misspelled or removed flag is an error, not a prefix of another flag
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    # ---- model, how it is trained, its data (flags shared with igpo.py, defined in shared_flags)
    shared_flags(p, model="toy", out_dir="out/sft", training=True)
    # ---- data (--dataset, --split, --question_col, --trace_col: shared_flags)
    p.add_argument("--toy_size", type=int, default=20000, help="embedded task: training problems")
    p.add_argument("--rewrite_model", default="", help="instruct causal LM that first rewrites the traces")
    p.add_argument("--rewrite_batch", type=int, default=16, help="traces per rewriter generate() (memory)")
    # ---- length alignment
    p.add_argument("--gen_length", type=int, default=48, help="L: response = RL/eval length (paper: 256)")
    # ---- optimisation
    p.add_argument("--max_steps", type=int, default=3000, help="optimizer steps (the schedule's length)")
    p.add_argument("--stop_all_wrong", type=float, default=None, help="stop once at most this fraction of "
                   "held-out problems is all wrong at T = 1.2, G = 8 (embedded default 0.35; 0: never)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=50, help="linear warmup, then cosine decay to 10%%")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--save_every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--log_every", type=int, default=200, help="steps between metric lines")
    args = p.parse_args(argv)
    if args.stop_all_wrong is None:  # the embedded default stops in the regime IGPO is for; real data never
        args.stop_all_wrong = 0.35 if args.dataset == "toy" else 0.0
    if args.stop_all_wrong and args.dataset != "toy":
        fail("--stop_all_wrong needs the embedded task (its held-out problems and grader)")
    if args.rewrite_model and args.dataset == "toy":
        fail("--rewrite_model needs real data (--dataset): the embedded traces are concise already")
    return args


def shared_flags(p, model, out_dir, training):
    # The flags all three scripts share, defined once so that each means the same thing everywhere.
    p.add_argument("--model", default=model, help="'toy' (the embedded tiny model), a hub id or a folder")
    p.add_argument("--trust_remote_code", action="store_true", help="run the model's own code (LLaDA, Dream)")
    p.add_argument("--out_dir", default=out_dir, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="fp32 | bf16: bf16 "
                   "autocast, fp32 trained weights | auto: bf16 on a GPU, fp32 on CPU (NOTES.md §7)")
    if training:
        p.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 trains every weight (paper: 128)")
        p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha (paper: 64)")
        p.add_argument("--lora_targets", default="", help="comma-separated Linear names; default: sft.MODELS")
        p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (less memory)")
        p.add_argument("--resume", action="store_true", help="continue the run saved in --out_dir")
        p.add_argument("--overwrite", action="store_true", help="replace a run already in --out_dir")
        p.add_argument("--dataset", default="toy", help="'toy', a hub id, or a local .json/.jsonl file")
        p.add_argument("--split", default="train", help="dataset split to train on")
        p.add_argument("--question_col", default="question", help="question column (MetaMathQA: query)")
        p.add_argument("--trace_col", default="trace", help="reasoning trace y* (MetaMathQA: response)")


def fail(msg):
    # Bad input ends the run with one line that names the problem, never a traceback.
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------------------
# The embedded world: word tokenizer, tiny bidirectional transformer, arithmetic word problems.

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea", "Max", "Nia"]
ITEMS = ["apples", "coins", "cards", "books", "shells", "stamps", "pens", "eggs", "beads", "rocks"]
WORDS = NAMES + ITEMS + ["user", "assistant", "has", "Each", "day", "gets", "more", "gives", "away", "How",
                         "many", "after", "days", "Day", "so", "The", "answer", "is", "boxed"]
MAX_NUMBER = 99  # numbers 0..99 are single tokens
# Difficulty knob: a problem applies its rule on 1..TOY_MAX_DAYS days; the trace has one line per day.
TOY_MAX_DAYS, TOY_MAX_RULE, TOY_MAX_VALUE = 6, 4, 30  # days, k in "gets k more", largest number in a trace


def build_toy_tokenizer():
    # A word-level tokenizer, as LLaDA's BPE is: one token per word (with its leading space, as BPE merges
    # it), per number 0..99 and per punctuation mark, plus LLaDA's special tokens and chat template.
    # A space before a number is a token of its own, so that a number is the *same* token in the question
    # ("has 14") and in the trace ("14+3=17"): copying it is then the identity. With " 14" and "14" as two
    # tokens the tiny model must also learn 100 pairings first, and did not in 1,000 steps (NOTES.md §10.1).
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pieces = [p for w in WORDS + list("+-*=.,:?{}\\") for p in (w, " " + w)]
    numbers = [str(n) for n in range(MAX_NUMBER + 1)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + pieces + numbers + [" ", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))  # anything outside the task's words is <|unk|>
    words = Regex(r" ?[A-Za-z]+|\d+| ?[^\sA-Za-z\d]|\s")  # a word with its space, a number, a mark, a space
    tok.pre_tokenizer = pre_tokenizers.Split(words, behavior="isolated")
    tok.decoder = decoders.Fuse()  # tokens are glued back as they are: decode(encode(text)) == text
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   mask_token=MASK, unk_token=UNK, clean_up_tokenization_spaces=False,
                                   chat_template=LLADA_CHAT_TEMPLATE)


def build_toy_model(tokenizer, hidden=64, layers=4, heads=4, max_len=512):
    # A ~0.2M-parameter bidirectional transformer: ModernBERT, which has LLaDA's calling contract
    # (model(ids).logits at every position, no causal mask) and loads back through the transformers Auto
    # classes with no custom code. global_attn_every_n_layers=1 and local_attention=max_len: every layer
    # attends over the whole sequence, as LLaDA's do (ModernBERT's default alternates with a sliding window).
    # Of the special ids only the pad id reaches the model (its embedding row starts at zero).
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    return ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=max_len, global_attn_every_n_layers=1,
        local_attention=max_len, reference_compile=False, pad_token_id=tokenizer.pad_token_id))


def toy_dataset(split, size, seed=0, max_days=TOY_MAX_DAYS):
    # `size` word problems of one split, as a datasets.Dataset. A problem: a start amount and one rule applied
    # every day for n days (1 <= n <= max_days). Each trace line needs only the line before it and the rule,
    # which sits at a fixed place in the question, so nothing has to be searched for in the prompt; n is the
    # difficulty (one more line, one more chance to slip). A row holds the question, a concise trace (one
    # "a+k=b" line per day), a verbose one (~3.5x longer), the answer and n.
    # Train and test are disjoint by construction: a problem belongs to the test split iff a hash of its
    # question text is 0 mod 10, so no question is in both.
    # seed names the random stream (an int for SFT, "rl-<seed>" for igpo.py's prompts).
    import zlib
    from datasets import Dataset
    rng, rows = random.Random(f"{split}-{seed}"), {}  # question -> row: each question once
    while len(rows) < size:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        n, k = rng.randint(1, max_days), rng.randint(1, TOY_MAX_RULE)
        if rng.random() < 0.5:  # grows: every value stays <= TOY_MAX_VALUE
            x, sign, rule, change = rng.randint(1, TOY_MAX_VALUE - n * k), "+", f"gets {k} more", k
        else:  # shrinks: every value stays >= 1
            x, sign, rule, change = rng.randint(n * k + 1, TOY_MAX_VALUE), "-", f"gives away {k}", -k
        question = f"{name} has {x} {item}. Each day {name} {rule}. How many {item} after {n} days?"
        xs = [x + change * day for day in range(n + 1)]  # the amount at the start, then after each day
        concise = "\n".join(f"{xs[day - 1]}{sign}{k}={xs[day]}" for day in range(1, n + 1))
        verbose = " ".join(f"Day {day}: {name} {rule}, so {xs[day - 1]} {sign} {k} = {xs[day]} {item}."
                           for day in range(1, n + 1))
        boxed = f"\\boxed{{{xs[n]}}}"
        # crc32, not hash(): Python salts str hashes per process, and the split must be the same every run
        in_test = zlib.crc32(question.encode()) % 10 == 0
        if in_test == (split == "test") and question not in rows:
            rows[question] = {"question": question, "trace": f"{concise}\n{boxed}",
                              "verbose": f"{verbose} The answer is {boxed}.", "answer": str(xs[n]), "days": n}
    return Dataset.from_list(list(rows.values()))


# ----------------------------------------------------------------------------------------------------------
# Data, prompts and responses, shared by the three scripts (load_rows reads real data, for eval.py too).

def load_rows(dataset, split, columns, config=None):
    # Load a dataset and check that the columns we need exist (one-line error otherwise).
    import datasets
    datasets.disable_progress_bars()  # keeps stderr for errors
    local = dataset.endswith((".json", ".jsonl"))  # a local file: datasets' JSON reader, its one split
    path, files, split = ("json", dataset, "train") if local else (dataset, None, split)
    try:  # a missing or malformed file, or a bad hub id, would surface as a deep datasets traceback
        ds = datasets.load_dataset(path, config, data_files=files, split=split)
    except Exception as e:
        what = f"read {dataset} as JSON/JSONL" if local else f"load dataset '{dataset}' (split {split})"
        fail(f"could not {what}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        fail(f"dataset {dataset} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    return ds


def make_prompt(tokenizer, question, toy):
    # The chat-formatted prompt used identically by SFT, RL and evaluation.
    content = question if toy else REASONING_PROMPT + question
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def encode_response(tokenizer, trace, gen_length, end_ids):
    # Eq. (2) length alignment: trace + end of turn, padded to exactly gen_length tokens (end_ids: the
    # model's end of turn, then its padding). None when the trace does not fit.
    ids = tokenizer(trace, add_special_tokens=False).input_ids + [end_ids[0]]
    return ids + [end_ids[-1]] * (gen_length - len(ids)) if len(ids) <= gen_length else None


def equal_length_batches(lengths, size):
    # Lists of at most `size` row indices that share a prompt length: no padding ever enters a model, as
    # LLaDA's hub code ignores attention_mask, so a prompt would attend to its pads (NOTES.md §3 item 16)
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [g[k:k + size] for g in groups.values() for k in range(0, len(g), size)]


# ----------------------------------------------------------------------------------------------------------
# What differs between masked diffusion LMs, in one place (NOTES.md §11, "Porting to another model").
# A model is looked up by its config's model_type; one the table does not know is refused, never guessed.

MODELS = {  # config.model_type -> (mask token, end tokens, logits shifted?, default LoRA targets, cache?)
    # the end tokens: (end of turn, the padding after it); an answer ends at the first of either. cache: the
    # forward can run part of a canvas against the keys and values of what precedes it, with bidirectional
    # attention (--kv_cache): Dream can; LLaDA's hub code asserts that no cache is passed (and its cache path
    # would attend causally); the embedded ModernBERT takes none
    "modernbert": (MASK, (EOT, EOS), False, ("Wqkv", "Wo", "Wi"), False),  # the embedded model
    # LLaDA's seven block projections are q_proj k_proj v_proj attn_out ff_proj up_proj ff_out; the official
    # IGPO config lists q/k/v/o/gate/up/down_proj, of which these four exist in LLaDA (NOTES.md §3 item 19)
    "llada": (MASK, (EOT, EOS), False, ("q_proj", "k_proj", "v_proj", "up_proj"), False),
    # Dream predicts token i from the logits at position i - 1 (it started as an autoregressive model)
    "Dream": ("<|mask|>", ("<|im_end|>", EOS), True,
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
}


# A loaded model's entry of MODELS, with ids, as the sampler and losses read it. end_ids: (end of turn,
# padding); shifted: the logits at i - 1 predict token i; n_tokens: the ids the tokenizer can decode (none at
# or beyond it is ever drawn); kv_cache: the sampler may reuse a prefix's keys and values (--kv_cache).
Facts = namedtuple("Facts", ["mask_id", "end_ids", "shifted", "lora_targets", "n_tokens", "kv_cache"],
                   defaults=[False])


def model_facts(config, tokenizer):
    # This model's entry of MODELS, its tokens resolved to ids; a one-line error for anything missing.
    kind = getattr(config, "model_type", None)
    if kind not in MODELS:
        fail(f"model_type '{kind}' is not in sft.MODELS: its mask token, end tokens, logit shift and LoRA "
             f"targets are unknown (add an entry, NOTES.md §11)")
    mask, ends, shifted, targets, kv_cache = MODELS[kind]
    vocab = tokenizer.get_vocab()
    for token in (mask, *ends):
        if token not in vocab:
            fail(f"tokenizer of this {kind} model has no token {token}: not the model sft.MODELS describes")
    return Facts(vocab[mask], tuple(vocab[t] for t in ends), shifted, targets, len(tokenizer), kv_cache)


# ----------------------------------------------------------------------------------------------------------
# Model loading and precision, shared by the three scripts.

def precision_policy(name, device, frozen_base):
    # (dtype the weights are loaded in, autocast dtype or None). bf16 computes under autocast but keeps every
    # trained weight in fp32: AdamW moves a weight by ~lr per step, below half a bf16 ulp of most weights at
    # the learning rates in use, so bf16 weights would mostly not move at all. Weights nothing updates (a
    # frozen LoRA base, a hub model evaluated) are stored in bf16: half the memory.
    bf16 = name == "bf16" or (name == "auto" and device.type == "cuda")  # auto: bf16 on a GPU, fp32 on CPU
    return (torch.bfloat16 if bf16 and frozen_base else torch.float32), (torch.bfloat16 if bf16 else None)


def precision_line(model, amp_dtype):
    # The line each script prints: the dtypes the loaded parameters are stored in, and what computes.
    stored = " + ".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}))
    compute = str(amp_dtype).replace("torch.", "") + " autocast" if amp_dtype else "float32"
    return f"precision: weights {stored}, compute {compute}"


def autocast(device, amp_dtype):
    # The policy's compute precision as a context (nothing under fp32).
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def load_model(name, trust_remote_code=False, device="cpu", dtype=None, merge=False):
    # (model, tokenizer, facts) from 'toy', a hub id, or a save_pretrained folder: a full model, or a LoRA
    # adapter over its base, which may be an adapter folder itself (the SFT -> IGPO -> eval chain). Masked LMs
    # load with AutoModelForMaskedLM; models that ship their own code (LLaDA, Dream) with AutoModel, which
    # their auto_map points at their diffusion LM class.
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    if name == "toy":
        tokenizer = build_toy_tokenizer()
        model = build_toy_model(tokenizer).to(device=device, dtype=dtype)
        return model, tokenizer, model_facts(model.config, tokenizer)
    if os.path.exists(os.path.join(name, "adapter_config.json")):  # a LoRA checkpoint saved by these scripts
        from peft import PeftModel
        base = json.load(open(os.path.join(name, "adapter_config.json")))["base_model_name_or_path"]
        model, tokenizer, facts = load_model(base, trust_remote_code, device, dtype)
        # Each stage's adapter stays a separate fp32 module, active and frozen: merged into bf16 weights,
        # every change smaller than half a bf16 step would round away (NOTES.md §7). merge=True folds them
        # in, for full fine-tuning from an adapter (its weights are fp32, where the sum is exact).
        stage = f"stage{len(getattr(model, 'peft_config', {}))}"
        if isinstance(model, PeftModel):
            model.load_adapter(name, adapter_name=stage)
        else:
            model = PeftModel.from_pretrained(model, name, adapter_name=stage)
        model.base_model.set_adapter(list(model.peft_config), inference_mode=True)
        for m in model.modules():  # a frozen stage belongs to the model RL starts from: no dropout on it
            if stage in getattr(m, "lora_dropout", {}):
                m.lora_dropout[stage] = torch.nn.Identity()
        if merge:
            model = model.merge_and_unload().requires_grad_()  # PEFT froze the base weights: all train again
        model.name_or_path = name  # an adapter trained on this model names this folder as its base
        return model, tokenizer, facts
    if not os.path.isdir(name) and (name.count("/") != 1 or name.startswith((".", "/", "~"))):
        fail(f"model not found: '{name}' is neither a checkpoint folder nor a hub id (org/name)")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        auto = AutoModel if getattr(config, "auto_map", None) else AutoModelForMaskedLM
        model = auto.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        # the advice about the flag is on the message's second line, which the one-line error would drop
        hint = "; pass --trust_remote_code to allow it" if "trust_remote_code=True" in str(e) else ""
        fail(f"could not load model '{name}': {str(e).splitlines()[0][:300]}{hint}")
    # Dream's config asks every forward to build a KV cache that nothing reads (memory: NOTES.md §7); only
    # the sampler's --kv_cache builds one, and asks for it by argument
    model.config.use_cache = False
    return model.to(device), tokenizer, model_facts(config, tokenizer)


def add_lora(model, r, alpha, targets, resume_dir=None, dropout=0.05):
    # The trainable LoRA adapter ("default") on the Linear layers named in `targets`, never on the vocabulary
    # head: LLaDA's head is also named `ff_out` (model.transformer.ff_out, 4096 x 126,464) and neither the
    # paper nor the official code adapts it. On a model loaded with adapters (SFT), it is stacked on them.
    from peft import LoraConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict
    stacked = isinstance(model, PeftModel)
    core = model.get_base_model() if stacked else model
    head = getattr(core, "get_output_embeddings", lambda: None)()
    # every Linear layer's own name (an adapted one is a LoRA layer holding its Linear as `base_layer`)
    names = {n.removesuffix(".base_layer").split(".")[-1] for n, m in core.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in n}
    missing = [t for t in targets if t not in names]
    if missing:
        fail(f"--lora_targets: no Linear layer named {missing[0]} in this model "
             f"(its Linear layers: {', '.join(sorted(names))})")
    exclude = [n for n, m in core.named_modules() if m is head]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        exclude_modules=exclude or None)
    if stacked:  # the loaded stages stay active and frozen; only "default" trains
        config.base_model_name_or_path = model.name_or_path  # the folder the saved adapter loads onto
        frozen = list(model.peft_config)
        model.add_adapter("default", config)
        model.base_model.set_adapter(frozen + ["default"])
        model.set_requires_grad(frozen, False)
    else:
        model = get_peft_model(model, config)
    if resume_dir:  # a resumed LoRA run: its saved adapter weights (adapter_model.safetensors)
        set_peft_model_state_dict(model, load_peft_weights(resume_dir, device="cpu"))
    return model


def enable_grad_ckpt(model):
    model = model.get_base_model() if hasattr(model, "peft_config") else model  # under loaded adapters
    inner = getattr(model, "model", None)
    if hasattr(inner, "set_activation_checkpointing"):  # LLaDA (OLMo code): its own switch, no HF flag
        return inner.set_activation_checkpointing("whole_layer")  # recompute every block in backward
    if not getattr(model, "supports_gradient_checkpointing", False):
        fail(f"--grad_ckpt: {type(model).__name__} does not support gradient checkpointing")
    # non-reentrant: correct when no input of a checkpointed block needs a gradient (frozen embeddings, LoRA)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def setup_model(args, device, state):
    # What a trainer (sft.py, igpo.py) trains: the model from --model (resuming full fine-tuning: from
    # --out_dir), in the precision policy's dtype, with gradient checkpointing and LoRA if asked for.
    # Returns (policy, model: DDP-wrapped under torchrun, its trained params, tokenizer, facts, amp dtype).
    if args.lora_r and args.model == "toy":  # an adapter saved over a random model could not be loaded back
        fail("--lora_r needs a saved base model (a folder or hub id); the embedded model is built at random")
    dtype, amp_dtype = precision_policy(args.precision, device, frozen_base=args.lora_r > 0)
    start = args.out_dir if state and not args.lora_r else args.model
    policy, tokenizer, facts = load_model(start, args.trust_remote_code, device, dtype, merge=not args.lora_r)
    if args.grad_ckpt:
        enable_grad_ckpt(policy)
    if args.lora_r:  # a resumed LoRA run reloads its adapter
        targets = args.lora_targets.split(",") if args.lora_targets else facts.lora_targets
        policy = add_lora(policy, args.lora_r, args.lora_alpha, targets, args.out_dir if state else None)
    # under torchrun, DDP averages the gradients over ranks inside backward(), on the module's one device
    # (device_ids left to None: torch's single-device use); no buffer sync in forward: ranks make different
    # numbers of forwards (one per prompt length), and one waiting on the others would hang (buffers: fixed)
    ddp = rank_and_world()[1] > 1  # under torchrun
    model = torch.nn.parallel.DistributedDataParallel(policy, forward_sync_buffers=False) if ddp else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in params)
    print(f"model: {args.model} | {n_trained / 1e6:.2f}M trained | {precision_line(policy, amp_dtype)}")
    return policy, model, params, tokenizer, facts, amp_dtype


# ----------------------------------------------------------------------------------------------------------
# The objective.

def sft_loss(model, rows, facts, gen):
    # Eq. (2): masked-diffusion SFT loss on response tokens only. rows: B pairs (prompt ids, response ids),
    # every response exactly L tokens (trace, end of turn, padding: learning where to stop is part of the
    # task). Per sequence draw t ~ U(0,1), mask each response token with probability p = (1-eps) t + eps,
    # keep the prompt clean, and score the masked tokens with 1/p importance weights, normalised by the
    # response length L and averaged over the batch:
    #     loss = (1/B) sum_b (1/L) sum_{i masked} -log f(x0_i | x_t) / p_b
    B, L = len(rows), len(rows[0][1])
    t = torch.rand(B, 1, device=gen.device, generator=gen)  # every tensor lives on the generator's device
    p = (1 - LOG_EPS) * t + LOG_EPS  # (B, 1)
    masked = torch.rand(B, L, device=gen.device, generator=gen) < p  # (B, L): response positions only
    total = 0.0
    for group in equal_length_batches([len(q) for q, _ in rows], B):  # no padding enters the model
        P = len(rows[group[0]][0])
        x0 = torch.tensor([rows[i][0] + rows[i][1] for i in group], device=gen.device)  # (b, P + L)
        m = masked[group]  # (b, L)
        xt = x0.clone()
        xt[:, P:] = torch.where(m, facts.mask_id, x0[:, P:])  # x_t of Eq. (1), restricted to the response
        logits = model(xt).logits[:, P - facts.shifted:P + L - facts.shifted]  # (b, L, V): the response's
        nll = torch.nn.functional.cross_entropy(logits[m].float(), x0[:, P:][m], reduction="none")
        # 1/p undoes the masking rate (Eq. (1)): without it low-t samples (few masked tokens) hardly count
        total = total + (nll / (p[group] * L).expand(-1, L)[m]).sum()
    return total / B


def build_sft_data(args, tokenizer, facts, device, same_answer):
    # Tokenised (prompt, response) pairs whose responses fit --gen_length (the over-length filter). With
    # --rewrite_model the responses are the kept rewrites of the traces (the rewriting step, below).
    toy, cols = args.dataset == "toy", [args.question_col, args.trace_col]  # embedded: trace or verbose
    ds = toy_dataset("train", args.toy_size, args.seed) if toy else load_rows(args.dataset, args.split, cols)
    questions, traces = ds[args.question_col], [str(t) for t in ds[args.trace_col]]
    if args.rewrite_model:
        questions, traces = rewrite_traces(questions, traces, args, tokenizer, facts, device, same_answer)
    # length alignment (Eq. (2)): a trace longer than L is dropped (None), never truncated
    L = args.gen_length
    responses = [encode_response(tokenizer, t, L, facts.end_ids) for t in traces]
    rows = [(tokenizer(make_prompt(tokenizer, q, toy), add_special_tokens=False).input_ids, r)
            for q, r in zip(questions, responses) if r is not None]
    print(f"data: {len(rows)} traces fit gen_length={L}, {len(traces) - len(rows)} longer ones dropped")
    if not rows:
        fail(f"no trace fits --gen_length {L}; raise it or use shorter traces")
    return rows


# The rewriting step's request (NOTES.md §3 item 9), one user turn of the rewriter's chat template. It asks
# for the answer format of SFT's own prompt (REASONING_PROMPT); %s: the problem, then the original trace.
REWRITE_PROMPT = ("Rewrite the solution below concisely, step by step: keep only the steps that reach the "
                  "answer, and keep its final answer.\n" + REASONING_PROMPT + "Problem:\n%s\n\nSolution:\n%s")


def rewrite_traces(questions, traces, args, tokenizer, facts, device, same_answer):
    # The paper's rewriting step: a rewrite is kept only if it fits L in the policy's tokenizer and its final
    # answer grades equal to the original's (same_answer: eval.py's, the reward's grade()). Returns the kept
    # (questions, rewrites); each rewrite is appended to --out_dir/rewrites.jsonl, so a stopped run resumes.
    path = os.path.join(args.out_dir, "rewrites.jsonl")
    cached = open(path, "rb").read() if os.path.exists(path) else b""
    cached = cached[:cached.rfind(b"\n") + 1]  # a line cut short by a kill is dropped; its trace is redone
    lines = map(json.loads, cached.decode().splitlines())  # another rewriter's lines are not reused
    done = {(r["question"], r["trace"]): r["rewrite"] for r in lines if r["model"] == args.rewrite_model}
    pairs = list(zip(questions, traces))
    todo = [p for p in pairs if p not in done]
    if todo:
        if rank_and_world()[1] > 1:  # one process writes the cache: under torchrun it must be complete
            fail("--rewrite_model: rewrite in one process first (without torchrun, with --max_steps 0)")
        rewrite = load_rewriter(args.rewrite_model, device, 2 * args.gen_length)  # cut at 2 L: too long
        with open(path, "a", buffering=1) as f:  # line-buffered: each rewrite is on disk once written
            f.truncate(len(cached))
            for k in tqdm(range(0, len(todo), args.rewrite_batch), desc="rewrite"):
                batch = todo[k:k + args.rewrite_batch]
                for (q, t), r in zip(batch, rewrite(batch)):
                    done[q, t] = r
                    f.write(json.dumps(dict(model=args.rewrite_model, question=q, trace=t, rewrite=r)) + "\n")
    # the filter: a rewrite longer than L is counted too long; only one that fits has its answer graded
    L, rewrites = args.gen_length, [done[p] for p in pairs]
    fits = [encode_response(tokenizer, r, L, facts.end_ids) is not None for r in rewrites]
    kept = [i for i, (r, t) in enumerate(zip(rewrites, traces)) if fits[i] and same_answer(r, t)]
    counts = (f"{len(pairs)} traces rewritten ({len(pairs) - len(todo)} from the cache), {len(kept)} kept, "
              f"{sum(fits) - len(kept)} with a wrong answer, {fits.count(False)} too long for gen_length={L}")
    print(f"rewrite: {counts}")
    if not kept:  # the counts say why
        fail(f"--rewrite_model kept no trace: {counts}")
    return [questions[i] for i in kept], [rewrites[i] for i in kept]


def load_rewriter(name, device, max_new_tokens):
    # rewrite(pairs) -> texts: the local instruct causal LM `name` rewrites (question, trace) pairs by greedy
    # decoding. A batch is padded on the left, as a causal LM continues each row from its right end, and the
    # attention mask hides the padding (a causal LM's code applies it; LLaDA's does not, item 16).
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    try:
        tok = AutoTokenizer.from_pretrained(name, padding_side="left")
        lm = AutoModelForCausalLM.from_pretrained(name, dtype="auto").to(device)  # in eval mode
    except (OSError, ValueError) as e:
        fail(f"could not load --rewrite_model '{name}': {str(e).splitlines()[0][:300]}")
    if not tok.chat_template:
        fail(f"--rewrite_model '{name}' has no chat template: the rewriting step needs an instruct model")
    tok.pad_token = tok.pad_token or tok.eos_token  # many instruct tokenizers name no padding token

    def rewrite(pairs):
        chats = [[{"role": "user", "content": REWRITE_PROMPT % p}] for p in pairs]  # one user turn each
        x = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_dict=True,
                                    return_tensors="pt").to(device)  # input_ids, attention_mask (B, P)
        # plain greedy: a fresh config, not the model's (it may sample, penalise repeats), but its end ids
        greedy = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        out = lm.generate(x.input_ids, attention_mask=x.attention_mask, generation_config=greedy,
                          use_model_defaults=False)
        return [t.strip() for t in tok.batch_decode(out[:, x.input_ids.shape[1]:], skip_special_tokens=True)]
    return rewrite


def batch_at(rows, size, k, seed):
    # The k-th batch of `size` rows: a pure function of (seed, k), so resuming needs no saved data position.
    # Each epoch draws a new permutation of all rows.
    per_epoch = len(rows) // size
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100003 + k // per_epoch))
    return [rows[i] for i in perm[(k % per_epoch) * size:][:size].tolist()]


def main(argv=None, regime_check=None, same_answer=None):
    # regime_check (the stop rule) and same_answer (the rewrite filter) are eval.py's, handed in by the caller
    args = get_args(argv)
    if regime_check is None and args.stop_all_wrong and args.max_steps >= STOP_FROM:  # not after 500 steps
        fail("the stop rule needs eval.regime_check: sft.main(argv, regime_check=...), or --stop_all_wrong 0")
    if same_answer is None and args.rewrite_model:  # checked now, not after hours of rewriting
        fail("the rewriting step needs eval.same_answer: sft.main(argv, same_answer=...)")
    # ---- device and RNG: every random draw of the run comes from `gen` (the model's init: the global RNG)
    rank, world, device = init_distributed(args.device)  # world > 1 under torchrun
    torch.manual_seed(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed + rank)
    accum = split_over_ranks(args.grad_accum, world, "--grad_accum")  # this rank's micro-batches per step
    state = open_run(args)  # None unless --resume finds a checkpoint

    # ---- model (`policy` is saved, `model` takes the gradients), then data (filtered with its tokenizer)
    policy, model, params, tokenizer, facts, amp_dtype = setup_model(args, device, state)
    rows = build_sft_data(args, tokenizer, facts, device, same_answer)  # [(prompt ids, response ids)]

    # ---- optimizer: AdamW, linear warmup over W steps, then cosine decay to 10% of the peak at step T
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    W, T = args.warmup_steps, args.max_steps
    cosine = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * (s - W) / max(1, T - W)))  # 1 at s = W, 0.1 at T
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / W if s < W else cosine(s))
    step, skipped = restore(state, args.out_dir, opt, sched, [gen]) if state else (0, 0)
    bad = 0  # non-finite updates in a row

    # ---- training loop
    model.train()
    with tqdm(total=args.max_steps, initial=step, desc="sft", disable=None if rank == 0 else True) as bar:
        t0 = time.time()
        while step < args.max_steps:
            total = 0.0
            for micro in range(accum):
                k = step * args.grad_accum + micro * world + rank  # the step's micro-batches, dealt out
                batch = batch_at(rows, args.batch_size, k, args.seed)
                # Eq. (2) per micro-batch, divided by this rank's count; DDP averages over the ranks, so the
                # gradient is the whole step's (batch_size x grad_accum sequences, whatever the world size)
                with autocast(device, amp_dtype):
                    loss = sft_loss(model, batch, facts, gen) / accum
                loss.backward()
                total += loss.item()
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # the norm before clipping
            finite = bool(torch.isfinite(gnorm)) and math.isfinite(total)
            if finite:  # a non-finite update is skipped and counted; too many in a row stop the run
                opt.step()
            opt.zero_grad(set_to_none=True)
            skipped, bad = skipped + (not finite), count_bad(bad, finite)
            sched.step()  # the schedule follows steps taken, skipped or not, so resume needs only `step`
            step += 1
            bar.update(1)
            # ---- the regime check (the embedded default; NOTES.md §3 item 20): SFT stops once RL would meet
            # enough all-wrong groups for IGPO to act on, wherever this machine's rounding put the S-curve
            row = {"step": step, "loss": round(total, 5), "grad_norm": round(gnorm.item(), 4),
                   "lr": sched.get_last_lr()[0], "skipped": skipped, "seconds": round(time.time() - t0, 1)}
            stop = bool(args.stop_all_wrong) and step >= STOP_FROM and step % STOP_EVERY == 0
            if stop:
                row["all_wrong"] = regime_check(policy, tokenizer, facts, args.gen_length)
                stop = row["all_wrong"] <= args.stop_all_wrong
            # ---- everything below is logging and checkpoints
            if rank == 0 and (step % args.log_every == 0 or step == args.max_steps or "all_wrong" in row):
                log_metrics(args.out_dir, row)
                bar.write(log_line(row, row))
            if step % args.save_every == 0 or step == args.max_steps or stop:
                checkpoint(args, policy, tokenizer, opt, sched, [gen], step, skipped)
            if stop:
                print(f"stopped at step {step}: {100 * row['all_wrong']:.1f}% of held-out problems all wrong "
                      f"at T = 1.2, G = 8 (<= {100 * args.stop_all_wrong:.0f}%)")
                break
    print(f"saved {args.out_dir} ({time.time() - t0:.0f}s)" if step else "no step taken: no checkpoint saved")


# ==========================================================================================================
# Run machinery: skip on first reading. Atomic checkpoints, exact resume, torchrun, non-finite updates, the
# metrics file. sft.py and igpo.py call it with one line each: init_distributed (first), open_run (before the
# model), restore (after the optimizer), count_bad (each update), log_metrics and checkpoint (in the loop).

def init_distributed(device_name="auto"):
    # (rank, world_size, device). Under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK) this joins the
    # process group (NCCL on GPUs, gloo on CPU); otherwise it is a single process of rank 0.
    auto = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto: the GPU if there is one
    device = torch.device(auto if device_name == "auto" else device_name)
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            # leave the group at exit, unless left already: a rank exiting with it open can abort in gloo
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    rank, world = rank_and_world()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    return rank, world, device


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def split_over_ranks(n, world, flag):
    # A flag counts the whole step (README's commands run the same algorithm on 1 GPU or 8): each rank takes
    # n / world of it. Spreading B prompts over N GPUs keeps the paper's batch; N x B would multiply it.
    if n % world:
        fail(f"{flag} ({n}) must be a multiple of the number of processes ({world}): each takes a share")
    return n // world


def save_checkpoint(out_dir, model, tokenizer, args, state):
    # Write the whole checkpoint to out_dir.tmp, then swap it in with two renames, so an interrupted save
    # never damages the last good checkpoint. The folder loads with load_model() / the Auto classes.
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        fail("model weights are not finite; refusing to save over the last good checkpoint")
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = {"selected_adapters": ["default"]} if hasattr(model, "peft_config") else {}  # the trained one
    if not adapter and getattr(model, "generation_config", None) is not None:
        # Dream's code swaps in a generation config that save_pretrained cannot validate (transformers
        # 4.57); these scripts never use it, so a plain one is saved
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig()
    model.save_pretrained(tmp, safe_serialization=True, **adapter)
    tokenizer.save_pretrained(tmp)
    open(os.path.join(tmp, "args.json"), "w").write(json.dumps(vars(args), indent=1))
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))  # optimizer, scheduler, RNG: resume only
    # files written between saves (rewrites.jsonl: before the first) are carried over into the new folder
    for name in ("metrics.jsonl", "example.json", "eval_before.json", "rewrites.jsonl"):
        if os.path.exists(os.path.join(out_dir, name)):
            shutil.copy(os.path.join(out_dir, name), tmp)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def log_metrics(out_dir, row):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def open_run(args):
    # The saved state when --resume finds a checkpoint in --out_dir, else None (a fresh run). Rank 0 first
    # recovers from a save that was interrupted mid-swap and refuses to clobber another run; then it drops the
    # metric lines written after the checkpoint (or, in a fresh run, all of them): the run writes them again.
    rank, world = rank_and_world()
    out_dir, old, tmp = args.out_dir, args.out_dir + ".old", args.out_dir + ".tmp"
    if rank == 0:
        if not os.path.exists(out_dir) and os.path.exists(old):
            os.rename(old, out_dir)  # killed between save_checkpoint's two renames: the old one is intact
        for d in (old, tmp):  # killed before deleting .old: out_dir holds the new one; .tmp: half written
            shutil.rmtree(d, ignore_errors=True)
        if os.path.exists(os.path.join(out_dir, "args.json")) and not (args.resume or args.overwrite):
            fail(f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
        if args.overwrite and not args.resume:
            shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)  # every file of the run is written here
    if world > 1:  # the other ranks wait until rank 0 has the folder ready
        dist.barrier()
    saved = os.path.join(out_dir, "state.pt")
    # weights_only: tensors and plain values, never pickled code. map_location: rank 0 saved it from its GPU;
    # on the CPU (not by every rank onto GPU 0), the optimizer moves each moment to its parameter's device
    resume = args.resume and os.path.exists(saved)
    state = torch.load(saved, map_location="cpu", weights_only=True) if resume else None
    if state and len(state["rng"]) != world:  # each rank continues its own random streams: as many ranks
        fail(f"{out_dir} was saved by {len(state['rng'])} process(es); resume it with as many, not {world}")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics):
        lines = [l for l in open(metrics) if l.strip() and state and json.loads(l)["step"] <= state["step"]]
        open(metrics, "w").writelines(lines)
    return state


def restore(state, out_dir, opt, sched, gens):
    # Optimizer, schedule and every RNG stream as saved; returns (step, skipped).
    opt.load_state_dict(state.pop("opt"))  # popped: the run keeps no second copy of the moments
    sched.load_state_dict(state["sched"])
    rng = state["rng"][rank_and_world()[0]]  # this rank's streams
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None:  # LoRA dropout on a GPU draws from the device's own stream
        torch.cuda.set_rng_state(rng["cuda"], gens[0].device)
    for g, saved in zip(gens, rng["gens"]):
        g.set_state(saved)
    print(f"resumed {out_dir} at step {state['step']}")
    return state["step"], state["skipped"]


def checkpoint(args, model, tokenizer, opt, sched, gens, step, skipped):
    # Save weights + optimizer + every rank's RNG streams.
    rank, world = rank_and_world()
    # torch's global streams (dropout's: the CPU's, and the GPU's where the run's generators live) and the
    # run's generators; Python's `random` is never drawn
    cuda = torch.cuda.get_rng_state(gens[0].device) if gens[0].device.type == "cuda" else None
    mine = {"torch": torch.get_rng_state(), "cuda": cuda, "gens": [g.get_state() for g in gens]}
    rng = [mine] * world
    if world > 1:  # every rank's streams, so that a resume continues each one
        dist.all_gather_object(rng, mine)
    state = dict(opt=opt.state_dict(), sched=sched.state_dict(), rng=rng, step=step, skipped=skipped)
    if rank == 0:
        save_checkpoint(args.out_dir, model, tokenizer, args, state)
    if world > 1:  # no rank runs ahead of a save that may still fail
        dist.barrier()


def count_bad(bad, finite):
    # Non-finite updates in a row, after this one; more than MAX_BAD_UPDATES stop the run.
    bad = 0 if finite else bad + 1
    if bad > MAX_BAD_UPDATES:  # the last good checkpoint stays on disk
        fail(f"non-finite loss or gradient in {bad} updates in a row; stopped, the last checkpoint is kept")
    return bad


def log_line(row, keys):
    # The printed line of both trainers, `step 12 | loss 0.41 | ...` (fields: NOTES.md §5).
    return " | ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys)


if __name__ == "__main__":
    # Run as a script, this file is the module __main__, not the module `sft` that eval.py imports, so
    # importing eval here closes no circle (sft <- eval <- igpo): it hands its measures in
    from eval import regime_check, same_answer
    main(regime_check=regime_check, same_answer=same_answer)
