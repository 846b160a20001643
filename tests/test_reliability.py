"""Reliability: exact resume after SIGKILL, atomic checkpoints, determinism, non-finite updates, and the
safety rules for loading and saving (no eval/exec, weights-only torch.load, safetensors, no remote code)."""
import ast
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import igpo
import sft
from conftest import tiny_model

REAL_GRPO_LOSS = igpo.grpo_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sft.py", "igpo.py", "eval.py"]
# Subprocesses and the in-process reference runs both use one thread, so their float sums agree bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SFT_ARGS = ["--toy_size", "64", "--batch_size", "4", "--max_steps", "6", "--save_every", "2", "--log_every", "1"]

# Runs the script's main() but SIGKILLs the process right after the metric line of step {step} is written:
# a deterministic point between two checkpoints, with no chance for cleanup code to run.
KILLED_RUN = """
import os, signal, sys
import sft, {module}
log_metrics = sft.log_metrics
def log_then_die(out_dir, row):
    log_metrics(out_dir, row)
    if row["step"] == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
sft.log_metrics = log_then_die
{prelude}
{module}.main(sys.argv[1:])
"""
# The igpo runs below use a random model, which never writes an answer itself. So that the rescue path (hint
# RNG, replacement, entropy filter) runs, their hints may reveal the answer: every run, killed, resumed and the
# in-process reference, makes the whole trace hintable.
REVEAL_ANSWER = "import re; igpo.ANSWER_START = re.compile(r'(?!)')  # matches nothing: the answer is hintable"


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def weights(run):
    return load_file(os.path.join(run, "model.safetensors"))


def saved_state(run):
    """The resume state of a checkpoint (optimizer, schedule, RNG streams, step)."""
    return torch.load(os.path.join(run, "state.pt"), weights_only=True)


def metric_rows(run):
    """metrics.jsonl without the wall-clock field."""
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    for r in rows:
        r.pop("seconds")
    return rows


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    assert metric_rows(a) == metric_rows(b)


def run_killed_then_resumed(module, args, out, kill_step, prelude=""):
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(module=module, step=kill_step, prelude=prelude),
                             *args, "--out_dir", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert metric_rows(out)[-1]["step"] == kill_step  # the line after the last checkpoint is on disk
    script = [f"{module}.py"] if not prelude else ["-c", f"import sys, {module}\n{prelude}\n{module}.main(sys.argv[1:])"]
    resumed = subprocess.run([sys.executable, *script, *args, "--out_dir", str(out), "--resume"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout


# ---------------------------------------------------------------------------------------------------------
# Shared tiny IGPO setup: a random model, and data on which inpainting rescues groups, so the rescue path
# (hint RNG, replacement, entropy filter) is part of what a resume must reproduce.

@pytest.fixture(scope="module")
def igpo_setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("igpo")
    tiny_model(tokenizer).save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    with open(root / "add.jsonl", "w") as f:
        # with REVEAL_ANSWER the whole trace is hintable, so a fully revealed trace grades as correct; its end
        # token, hinted too, ends the row early, so early exit is part of the run as well
        for a in range(2, 12):
            for b in range(3, 7):
                trace = f"\\boxed{{{a + b}}}\n{sft.EOT}"
                f.write(json.dumps({"question": f"What is {a}+{b}?", "trace": trace}) + "\n")
    args = ["--model", str(root / "init"), "--dataset", str(root / "add.jsonl"), "--max_steps", "4",
            "--save_every", "1", "--batch_prompts", "2", "--num_generations", "4", "--gen_length", "16",
            "--block_length", "8", "--diffusion_steps", "8", "--eta_low", "0.5", "--eta_high", "1", "--limit", "0"]
    return root, args


@pytest.fixture(scope="module")
def igpo_reference(igpo_setup):
    """One uninterrupted run (in-process, one thread)."""
    root, args = igpo_setup
    n, answer_start = torch.get_num_threads(), igpo.ANSWER_START
    torch.set_num_threads(1)
    try:
        exec(REVEAL_ANSWER)
        igpo.main(args + ["--out_dir", str(root / "A")])
    finally:
        torch.set_num_threads(n)
        igpo.ANSWER_START = answer_start
    return root / "A"


# ---------------------------------------------------------------------------------------------------------
# 1. Resume after SIGKILL is exact.

@pytest.mark.slow
def test_sft_resume_after_sigkill_is_exact(tmp_path, one_thread):
    sft.main(SFT_ARGS + ["--out_dir", str(tmp_path / "A")])
    run_killed_then_resumed("sft", SFT_ARGS, tmp_path / "B", kill_step=3)  # checkpoint at 2, killed after 3
    assert_same_run(tmp_path / "A", tmp_path / "B")
    assert [r["step"] for r in metric_rows(tmp_path / "B")] == list(range(1, 7))


@pytest.mark.slow
def test_igpo_resume_after_sigkill_is_exact(igpo_setup, igpo_reference, tmp_path):
    root, args = igpo_setup
    assert sum(r["replaced"] for r in metric_rows(igpo_reference)) > 0  # the rescue path really ran
    run_killed_then_resumed("igpo", args, tmp_path / "B", kill_step=3, prelude=REVEAL_ANSWER)
    assert_same_run(igpo_reference, tmp_path / "B")
    # the worked example is written once, before a later checkpoint, and must survive the swaps
    assert json.load(open(igpo_reference / "example.json")) == json.load(open(tmp_path / "B" / "example.json"))


class Killed(BaseException):
    pass


def test_sft_killed_before_first_checkpoint_restarts_cleanly(tmp_path, monkeypatch, one_thread):
    """No checkpoint yet: --resume starts from scratch and the stale metric line of the dead run is dropped."""
    sft.main(SFT_ARGS + ["--out_dir", str(tmp_path / "A")])
    log_metrics = sft.log_metrics

    def log_then_die(out_dir, row):
        log_metrics(out_dir, row)
        if row["step"] == 1:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(sft, "log_metrics", log_then_die)
        with pytest.raises(Killed):
            sft.main(SFT_ARGS + ["--out_dir", str(tmp_path / "B")])
    assert not os.path.exists(tmp_path / "B" / "state.pt")
    sft.main(SFT_ARGS + ["--out_dir", str(tmp_path / "B"), "--resume"])
    assert_same_run(tmp_path / "A", tmp_path / "B")


# ---------------------------------------------------------------------------------------------------------
# 2. Atomic checkpoints: a save interrupted at any stage never loses the last good checkpoint.

class Crash(Exception):
    pass


def crash_on(fn, when):
    def wrapped(*a, **k):
        if when(*a, **k):
            raise Crash
        return fn(*a, **k)
    return wrapped


def half_written(path, **kw):
    os.makedirs(path)
    open(os.path.join(path, "model.safetensors"), "wb").write(b"\0" * 64)
    raise Crash


def files_digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


@pytest.mark.parametrize("stage", ["save_pretrained", "state", "rename_out", "rename_tmp", "delete_old"])
def test_interrupted_save_keeps_a_complete_checkpoint(tokenizer, tmp_path, monkeypatch, stage):
    out = str(tmp_path / "run")
    args = sft.get_args(["--out_dir", out])
    v1, v2, v3 = (tiny_model(tokenizer, seed=s) for s in (1, 2, 3))
    sft.save_checkpoint(out, v1, tokenizer, args, {"step": 1, "rng": [{}]})
    sft.log_metrics(out, {"step": 1})
    with monkeypatch.context() as m:
        if stage == "save_pretrained":  # weights half written into out.tmp
            m.setattr(v2, "save_pretrained", half_written)
        elif stage == "state":
            m.setattr(torch, "save", crash_on(torch.save, lambda *a, **k: True))
        elif stage == "rename_out":  # run -> run.old fails: nothing moved yet
            m.setattr(os, "rename", crash_on(os.rename, lambda src, dst: src == out))
        elif stage == "rename_tmp":  # run is already run.old, run.tmp not yet in place
            m.setattr(os, "rename", crash_on(os.rename, lambda src, dst: src == out + ".tmp"))
        else:  # the new checkpoint is in place, the old one not yet deleted
            m.setattr(shutil, "rmtree", crash_on(shutil.rmtree, lambda p, **k: p == out + ".old"))
        with pytest.raises(Crash):
            sft.save_checkpoint(out, v2, tokenizer, args, {"step": 2, "rng": [{}]})
    expect_step, expect_model = (2, v2) if stage == "delete_old" else (1, v1)

    state = sft.open_run(sft.get_args(["--out_dir", out, "--resume"]))  # a run to resume is found
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")
    assert state["step"] == expect_step
    saved = weights(out)
    common = [k for k in expect_model.state_dict() if k in saved]
    assert len(common) > 5 and all(torch.equal(saved[k], expect_model.state_dict()[k]) for k in common)
    assert [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))] == [{"step": 1}]
    # and the next save goes through normally
    sft.save_checkpoint(out, v3, tokenizer, args, {"step": 3, "rng": [{}]})
    assert saved_state(out)["step"] == 3 and not os.path.exists(out + ".old")


def test_taken_out_dir_refused_then_overwritten(tmp_path, tokenizer):
    out = str(tmp_path / "run")
    args = sft.get_args(["--out_dir", out])
    sft.save_checkpoint(out, tiny_model(tokenizer), tokenizer, args, {"step": 5, "rng": [{}]})
    before = files_digest(out)
    for main in (sft.main, igpo.main):  # both refuse before touching anything
        with pytest.raises(SystemExit) as e:
            main(["--out_dir", out, "--max_steps", "2"] + (["--model", out] if main is igpo.main else []))
        msg = str(e.value.code)
        assert msg.startswith("error:") and "already holds a run" in msg and "\n" not in msg
    assert files_digest(out) == before
    sft.main(["--out_dir", out, "--overwrite", "--toy_size", "64", "--batch_size", "4", "--max_steps", "2",
              "--log_every", "1"])
    assert saved_state(out)["step"] == 2 and [r["step"] for r in metric_rows(out)] == [1, 2]


def test_resume_loads_a_gpu_written_state_onto_the_cpu(tmp_path, tokenizer):
    """Rank 0 of a GPU run saves state.pt from cuda:0. Loaded without a map location, every rank would rebuild
    its tensors on GPU 0 (and a CPU machine could not load it at all): open_run must put them on the CPU, from
    where the optimizer's load_state_dict moves each moment next to its parameter."""
    from torch import serialization
    out = str(tmp_path / "run")
    state = {"opt": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}, "step": 4, "rng": [{}]}
    sft.save_checkpoint(out, tiny_model(tokenizer), tokenizer, sft.get_args(["--out_dir", out]), None)
    tag = (0, lambda storage: "cuda:0", lambda obj, location: None)  # asked first: every storage is cuda:0's
    serialization._package_registry.insert(0, tag)
    try:
        torch.save(state, os.path.join(out, "state.pt"))
    finally:
        serialization._package_registry.remove(tag)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file names a GPU
        torch.load(os.path.join(out, "state.pt"), weights_only=True)
    loaded = sft.open_run(sft.get_args(["--out_dir", out, "--resume"]))
    assert loaded["step"] == 4 and loaded["opt"]["state"][0]["exp_avg"].device.type == "cpu"


def test_checkpoint_saves_and_restores_the_cuda_generator(tmp_path, tokenizer, monkeypatch):
    """LoRA dropout on a GPU draws from the CUDA device's generator, so a resumed GPU run is exact only if the
    checkpoint holds that generator's state too. No GPU here: the run's generator is made to report a CUDA
    device, and torch.cuda's get/set of the state are replaced by a recorder of what is saved and restored."""
    class OnGpu:  # the run's generator as a GPU run has it (torch.Generator("cuda:1")), state kept on the CPU
        device = torch.device("cuda", 1)

        def __init__(self):
            self.state = torch.Generator().manual_seed(1).get_state()

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

    device_state, restored, devices = torch.arange(16, dtype=torch.uint8), [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": devices.append(device) or device_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state) or
                        devices.append(device))
    args = sft.get_args(["--out_dir", str(tmp_path / "run")])
    model = tiny_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sft.checkpoint(args, model, tokenizer, opt, sched, [OnGpu()], 3, 0)
    state = sft.open_run(sft.get_args(["--out_dir", str(tmp_path / "run"), "--resume"]))
    assert torch.equal(state["rng"][0]["cuda"], device_state)  # saved with the run's other streams
    sft.restore(state, args.out_dir, opt, sched, [OnGpu()])
    assert len(restored) == 1 and torch.equal(restored[0], device_state)  # and put back on resume
    assert devices == [torch.device("cuda", 1)] * 2  # the generators' GPU (--device cuda:1), not the current one


def test_resume_with_another_number_of_processes_is_a_one_line_error(tmp_path, tokenizer, monkeypatch):
    """Each rank continues its own saved random streams, so a run saved by one process and resumed by two (or the
    other way round) is refused with one line, before anything in the folder changes."""
    out = str(tmp_path / "run")
    sft.save_checkpoint(out, tiny_model(tokenizer), tokenizer, sft.get_args(["--out_dir", out]),
                        {"step": 1, "rng": [{"torch": torch.get_rng_state()}]})
    sft.log_metrics(out, {"step": 1})
    sft.log_metrics(out, {"step": 2})  # written after the checkpoint: a resume would drop it
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    monkeypatch.setattr(sft, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(sft.dist, "barrier", lambda: None)
    with pytest.raises(SystemExit) as e:
        sft.open_run(sft.get_args(["--out_dir", out, "--resume"]))
    assert e.value.code == f"error: {out} was saved by 1 process(es); resume it with as many, not 2"
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


# ---------------------------------------------------------------------------------------------------------
# 3. Determinism on CPU.

def test_igpo_fresh_run_replaces_a_dead_runs_example(igpo_setup, igpo_reference, tmp_path, one_thread, monkeypatch):
    """A run killed before its first checkpoint may leave example.json (the first rescue) behind; a fresh run in
    that folder shows its own first rescue, not the dead run's."""
    root, args = igpo_setup
    monkeypatch.setattr(igpo, "ANSWER_START", re.compile(r"(?!)"))  # as REVEAL_ANSWER, like the reference run
    os.makedirs(tmp_path / "B")
    (tmp_path / "B" / "example.json").write_text(json.dumps({"step": 3, "question": "a dead run's"}))
    igpo.main(args + ["--out_dir", str(tmp_path / "B")])
    assert json.load(open(tmp_path / "B" / "example.json")) == json.load(open(igpo_reference / "example.json"))


def test_igpo_same_seed_same_metrics(igpo_setup, igpo_reference, tmp_path, one_thread, monkeypatch):
    root, args = igpo_setup
    monkeypatch.setattr(igpo, "ANSWER_START", re.compile(r"(?!)"))  # as REVEAL_ANSWER, like the reference run
    igpo.main(args + ["--out_dir", str(tmp_path / "again")])
    assert_same_run(igpo_reference, tmp_path / "again")
    igpo.main(args + ["--out_dir", str(tmp_path / "seed1"), "--seed", "1"])
    assert metric_rows(tmp_path / "seed1") != metric_rows(igpo_reference)


# ---------------------------------------------------------------------------------------------------------
# 4. Non-finite losses and weights.

def nan_loss(calls):
    """grpo_loss that returns NaN for the call numbers in `calls` (1-based), the real loss otherwise."""
    n = [0]

    def loss_fn(*a, **k):
        n[0] += 1
        loss, kl, clip = REAL_GRPO_LOSS(*a, **k)
        return (loss * float("nan"), kl, clip) if n[0] in calls else (loss, kl, clip)
    return loss_fn


def test_nonfinite_update_is_skipped_and_counted(igpo_setup, tmp_path, monkeypatch):
    root, args = igpo_setup
    short = args + ["--max_steps", "1", "--num_iterations", "1"]
    monkeypatch.setattr(igpo, "grpo_loss", nan_loss({1}))
    igpo.main(short + ["--out_dir", str(tmp_path / "skip")])
    assert [r["skipped"] for r in metric_rows(tmp_path / "skip")] == [1]
    assert math.isnan(metric_rows(tmp_path / "skip")[0]["loss"])
    init = weights(root / "init")
    assert init.keys() == weights(tmp_path / "skip").keys()
    assert all(torch.equal(init[k], v) for k, v in weights(tmp_path / "skip").items())  # no step was taken
    # control: with a finite loss the same step does move the weights, and nothing is counted
    monkeypatch.setattr(igpo, "grpo_loss", nan_loss(set()))
    igpo.main(short + ["--out_dir", str(tmp_path / "ok")])
    assert [r["skipped"] for r in metric_rows(tmp_path / "ok")] == [0]
    assert any(not torch.equal(init[k], v) for k, v in weights(tmp_path / "ok").items())
    # a skipped update leaves nothing behind: with mu = 2 and the first update's loss NaN, the second update's
    # gradient is its own (finite), so it is taken and only one update is counted as skipped
    monkeypatch.setattr(igpo, "grpo_loss", nan_loss({1}))
    igpo.main(args + ["--max_steps", "1", "--num_iterations", "2", "--out_dir", str(tmp_path / "mu2")])
    (row,) = metric_rows(tmp_path / "mu2")
    assert row["skipped"] == 1 and math.isfinite(row["grad_norm"]) and math.isfinite(row["loss"])
    assert any(not torch.equal(init[k], v) for k, v in weights(tmp_path / "mu2").items())


def test_persistent_nonfinite_stops_run_and_keeps_checkpoint(igpo_setup, tmp_path, monkeypatch):
    root, args = igpo_setup
    out = tmp_path / "nan"
    monkeypatch.setattr(igpo, "grpo_loss", nan_loss(set(range(1, 100))))
    with pytest.raises(SystemExit) as e:  # mu = 2: steps 1 and 2 hold four updates, all non-finite
        igpo.main(args + ["--out_dir", str(out), "--num_iterations", "2", "--max_steps", "3"])
    msg = str(e.value.code)
    assert msg.startswith("error:") and "non-finite" in msg and "\n" not in msg
    assert saved_state(out)["step"] == 1 and [r["step"] for r in metric_rows(out)] == [1]
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_save_checkpoint_refuses_nonfinite_weights(tokenizer, tmp_path):
    out = str(tmp_path / "run")
    args = sft.get_args(["--out_dir", out])
    model = tiny_model(tokenizer)
    sft.save_checkpoint(out, model, tokenizer, args, {"step": 1, "rng": [{}]})
    before = files_digest(out)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(SystemExit) as e:
        sft.save_checkpoint(out, model, tokenizer, args, {"step": 2, "rng": [{}]})
    assert str(e.value.code).startswith("error:") and "not finite" in str(e.value.code)
    assert files_digest(out) == before
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")


# ---------------------------------------------------------------------------------------------------------
# 5. Security: nothing the model writes is executed, nothing pickled is unpickled, no remote code by default.

def calls(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_eval_exec_and_weights_only_load(script):
    for c in calls(script):
        f = c.func
        assert not (isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__")), ast.unparse(c)
        assert not (isinstance(f, ast.Attribute) and f.attr in ("loads", "load")
                    and isinstance(f.value, ast.Name) and f.value.id in ("pickle", "dill")), ast.unparse(c)
        if isinstance(f, ast.Attribute) and f.attr == "load" and ast.unparse(f.value) == "torch":
            kw = {k.arg: k.value for k in c.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, ast.unparse(c)
        for k in c.keywords:
            if k.arg == "trust_remote_code":  # only ever forwarded from a flag, never a literal True
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), ast.unparse(c)


def test_torch_load_is_used_and_checkpoint_is_safetensors(tokenizer, tmp_path):
    assert any(isinstance(c.func, ast.Attribute) and ast.unparse(c.func) == "torch.load" for c in calls("sft.py"))
    out = str(tmp_path / "run")
    sft.save_checkpoint(out, tiny_model(tokenizer), tokenizer, sft.get_args(["--out_dir", out]),
                        {"step": 1, "rng": [{"torch": torch.get_rng_state()}]})
    names = os.listdir(out)
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pkl")) for n in names)
    assert sft.open_run(sft.get_args(["--out_dir", out, "--resume"]))["step"] == 1  # loads with weights_only


def test_trust_remote_code_off_unless_flag(tmp_path, tokenizer, monkeypatch):
    assert inspect.signature(sft.load_model).parameters["trust_remote_code"].default is False
    assert sft.get_args([]).trust_remote_code is False
    assert igpo.get_args([]).trust_remote_code is False
    assert evaluation.get_args([]).trust_remote_code is False
    assert sft.get_args(["--trust_remote_code"]).trust_remote_code is True
    # and load_model forwards exactly that value to every from_pretrained call
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
    seen = []
    for cls in (AutoConfig, AutoModelForMaskedLM, AutoTokenizer):
        m = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _m=m, **k: seen.append(k.get("trust_remote_code")) or _m(*a, **k))
    tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    sft.load_model(str(tmp_path))
    assert len(seen) >= 3 and set(seen) == {False}
    seen.clear()
    sft.load_model(str(tmp_path), trust_remote_code=True)  # harmless here: this model ships no code
    assert len(seen) >= 3 and set(seen) == {True}


def test_igpo_run_identical_without_early_exit(igpo_setup, igpo_reference, tmp_path, one_thread, monkeypatch):
    """--early_exit is a speed knob only: without it the run has the same metrics and final weights, and with
    it (the default, as in the reference run) the sampler carried fewer rows through forward passes."""
    import eval as ev
    root, args = igpo_setup
    monkeypatch.setattr(igpo, "ANSWER_START", re.compile(r"(?!)"))  # as REVEAL_ANSWER, like the reference run
    rows, real = [], ev.logits_at
    monkeypatch.setattr(ev, "logits_at", lambda m, x, *a: rows.append(len(x)) or real(m, x, *a))  # the sampler's
    counts = []
    for flag in ("--no-early_exit", "--early_exit"):
        igpo.main(args + ["--out_dir", str(tmp_path / flag), flag])
        assert_same_run(igpo_reference, tmp_path / flag)
        counts.append(sum(rows) - sum(counts))
    assert counts[1] < counts[0]  # some rows ended early (504 vs 437 row-forwards when written)


# ---------------------------------------------------------------------------------------------------------
# 6. The module graph has no circle: sft <- eval <- igpo.

def script_imports(path):
    """The scripts (sft, eval, igpo) that `path` imports, at module level or inside functions, leaving out the
    `if __name__ == "__main__":` block: run as a script the file is the module __main__, which no one imports."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    main_guard = lambda n: isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"
    names = set()
    for node in (n for top in tree.body if not main_guard(top) for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & {"sft", "eval", "igpo"}


def test_no_import_circle_between_the_scripts():
    assert script_imports("sft.py") == set()  # the embedded world and the run machinery import no script
    assert script_imports("eval.py") == {"sft"}
    assert script_imports("igpo.py") == {"sft", "eval"}
    # and importing sft loads neither of the others
    probe = "import sys, sft; print(sorted({'eval', 'igpo'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
