"""The GPU path, checked on a GPU, in one command (under 10 minutes on one GPU):

    python tests/gpu_check.py                 # on a CUDA machine; elsewhere it prints one line and exits 0
    python tests/gpu_check.py --device cpu    # the same checks on the CPU, at toy sizes (the suite runs this)

What the CPU suite cannot see is what a GPU does differently: bf16 autocast on CUDA kernels, LoRA dropout
drawing from the CUDA generator, NCCL, checkpoints written from cuda:0. So this runs, on tiny random LLaDA and
Dream models built from their own hub code (tests/conftest.py):
1. the README's three stages for each (sft.py -> igpo.py -> eval.py, --trust_remote_code --lora_r --grad_ckpt,
   the precision policy's bf16 on a GPU), as written except the model, the data, the step counts and the batch;
   each stage's peak GPU memory and seconds per step are printed;
2. IGPO killed with SIGKILL after step 2 and resumed, against the same run uninterrupted, bit for bit (weights
   and metrics); a second uninterrupted run says whether the GPU itself repeats a run bit for bit, since a
   resume cannot be more exact than that;
3. a 2-process torchrun of IGPO (NCCL), resumed once, when the machine has two GPUs.
Exit status 1 if a check fails. Record what it prints in NOTES.md §7.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

from conftest import build_tiny_dream, build_tiny_llada  # noqa: E402  (also puts the repo root on sys.path)
from test_llada import METAMATH_ROWS, SHORT_ROWS, readme_command, readme_rewrites  # noqa: E402
from test_reliability import KILLED_RUN  # noqa: E402  (main(), SIGKILLed after a given step's metric line)

# The README's sampler and batch shape on a GPU (L = 256, block 32, 128 steps, one prompt per micro-batch),
# with 8 prompts per step instead of 64 to stay within minutes; a few tokens on the CPU.
SIZES = {"cuda": dict(gen_length=256, block_length=32, diffusion_steps=128, batch_prompts=8, grad_accum=8,
                      num_generations=8, gen_batch=64, sft_gen_length=256),
         "cpu": dict(gen_length=16, block_length=8, diffusion_steps=8, batch_prompts=2, grad_accum=2,
                     num_generations=2, gen_batch=4, sft_gen_length=16)}
KILL_AT, STEPS = 2, 3  # IGPO steps: killed after this one, then resumed to the end


def stage(name, run, device, results):
    """Run one stage in this process; record its wall time and peak GPU memory."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    results.append({"stage": name, "seconds": round(time.time() - t0, 1), "peak_GiB": round(peak, 3)})


def write_data(root, sft_out):
    # The README's three inputs, in their layouts: OpenR1-Math-shaped rows (SFT; their rewrites already in the
    # SFT run's cache, as the suite's README chains have them, so no rewriter is loaded), MetaMathQA rows (IGPO:
    # the test's rows and 16 more GSM_AnsAug-shaped ones, enough for 8 prompts a step), MATH500 (eval).
    more = [{"query": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
             "response": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}\nThe answer is: {a + b}",
             "type": "GSM_AnsAug"} for a in range(3, 7) for b in range(2, 6)]
    openr1 = [{"problem": r["question"], "solution": "First, " + r["trace"]} for r in SHORT_ROWS]
    files = {"traces.jsonl": openr1, "metamath.jsonl": METAMATH_ROWS + more,
             "math500.jsonl": [{"problem": r["question"], "answer": r["trace"][-2]} for r in SHORT_ROWS],
             os.path.join(sft_out, "rewrites.jsonl"): readme_rewrites(openr1)}
    os.makedirs(sft_out)
    for name, rows in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return [os.path.join(root, name) for name in files][:3]


def igpo_flags(model, which, metamath, size, out_dir, steps):
    return readme_command("igpo.py", which, model=model, dataset=metamath, max_steps=steps, save_every=1,
                          warmup_steps=1, out_dir=out_dir, precision="bf16", **{k: size[k] for k in (
                              "gen_length", "block_length", "diffusion_steps", "batch_prompts", "grad_accum",
                              "num_generations", "gen_batch")})


def readme_chain(which, model, root, size, device, results):
    """The README's three commands for `which` (LLaDA or Dream) on the tiny model, in this process."""
    import eval as evaluation
    import igpo
    import sft
    sft_out, igpo_out = os.path.join(root, f"sft_{which}"), os.path.join(root, f"igpo_{which}")
    traces, metamath, bench = write_data(root, sft_out)
    sft_flags = readme_command("sft.py", which, model=model, dataset=traces, gen_length=size["sft_gen_length"],
                               grad_accum=8, max_steps=4, warmup_steps=1, out_dir=sft_out, device=device,
                               precision="bf16")
    stage(f"{which} sft.py, 4 steps", lambda: sft.main(sft_flags, same_answer=evaluation.same_answer), device,
          results)
    flags = igpo_flags(sft_out, which, metamath, size, igpo_out, 2) + ["--device", device]
    stage(f"{which} igpo.py, 2 steps", lambda: igpo.main(flags), device, results)
    per_step = [json.loads(line)["seconds"] for line in open(os.path.join(igpo_out, "metrics.jsonl"))]
    results[-1]["seconds_per_step"] = per_step
    eval_flags = readme_command("eval.py", which, model=igpo_out, data=bench, out_dir=root, device=device,
                                precision="bf16",
                                **{k: size[k] for k in ("gen_length", "block_length", "diffusion_steps")})
    stage(f"{which} eval.py, {len(SHORT_ROWS)} questions", lambda: evaluation.main(eval_flags), device, results)
    accuracy = json.load(open(os.path.join(root, "eval_math500.json")))["metrics"]["accuracy"]
    return 0.0 <= accuracy <= 1.0 and os.path.exists(os.path.join(igpo_out, "adapter_model.safetensors"))


def same_run(a, b):
    """(weights identical, metrics identical, largest weight difference) of two IGPO run folders."""
    from safetensors.torch import load_file
    wa, wb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(os.path.join(d,
            "metrics.jsonl"))] for d in (a, b)]
    return diff == 0.0, rows[0] == rows[1], diff


def subprocess_run(argv, env):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def kill_and_resume(model, root, size, device, env):
    """IGPO from the SFT adapter: twice uninterrupted, once killed after step KILL_AT and resumed."""
    metamath = os.path.join(root, "metamath.jsonl")
    runs = {name: os.path.join(root, f"resume_{name}") for name in ("a", "b", "killed")}
    flags = {name: igpo_flags(model, "LLaDA", metamath, size, out, STEPS) + ["--device", device]
             for name, out in runs.items()}
    for name in ("a", "b"):
        r = subprocess_run(["igpo.py", *flags[name]], env)
        assert r.returncode == 0, r.stderr[-2000:]
    killed = subprocess_run(["-c", KILLED_RUN.format(module="igpo", step=KILL_AT, prelude=""), *flags["killed"]],
                            env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess_run(["igpo.py", *flags["killed"], "--resume"], env)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-2000:]
    return same_run(runs["a"], runs["b"]), same_run(runs["a"], runs["killed"])


def torchrun_igpo(model, root, size, env):
    """2 processes, one GPU each (NCCL): 2 steps, then resumed to 3."""
    out = os.path.join(root, "torchrun")
    flags = igpo_flags(model, "LLaDA", os.path.join(root, "metamath.jsonl"), size, out, 2)
    run = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "igpo.py"]
    first = subprocess_run(run + flags, env)
    flags[flags.index("--max_steps") + 1] = "3"
    resumed = subprocess_run(run + flags + ["--resume"], env)
    return first.returncode == 0 and resumed.returncode == 0 and "resumed" in resumed.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same checks, toy sizes")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device here (run it on a GPU machine; --device cpu checks the script)")
        return 0
    size, env = SIZES[args.device], {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                     "PYTHONPATH": ROOT}
    t0, results, checks = time.time(), [], {}
    what = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"gpu_check on {what}, torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s)")
    with tempfile.TemporaryDirectory() as root:
        llada = build_tiny_llada(os.path.join(root, "tiny_llada"))
        dream = build_tiny_dream(os.path.join(root, "tiny_dream"))
        for which, model in (("LLaDA", llada), ("Dream", dream)):
            checks[f"README chain, {which}"] = readme_chain(which, model, root, size, args.device, results)
        t = time.time()
        (runs_equal, _, run_diff), (resume_equal, metrics_equal, resume_diff) = kill_and_resume(
            os.path.join(root, "sft_LLaDA"), root, size, args.device, env)
        results.append({"stage": f"LLaDA igpo.py x 3 runs of {STEPS} steps (kill, resume)",
                        "seconds": round(time.time() - t, 1)})
        print(f"two uninterrupted runs: weights identical {runs_equal} (largest difference {run_diff:.3g})")
        print(f"killed after step {KILL_AT} and resumed: weights identical {resume_equal} (largest difference "
              f"{resume_diff:.3g}), metrics identical {metrics_equal}")
        # a resume can only be as exact as the device repeats a run: require it where the device does
        checks["resume bit for bit"] = (resume_equal and metrics_equal) or not runs_equal
        if args.device == "cuda" and torch.cuda.device_count() >= 2:
            checks["torchrun, 2 GPUs, resumed"] = torchrun_igpo(os.path.join(root, "sft_LLaDA"), root, size, env)
    for r in results:
        print(" | ".join(f"{k} {v}" for k, v in r.items()))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"gpu_check: {sum(checks.values())} of {len(checks)} checks passed in {time.time() - t0:.0f} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
