"""Paper-scale and multi-GPU code paths, exercised on CPU with tiny models: LoRA with the adapter-disabled
reference, models that ship their own code (--trust_remote_code, as LLaDA-8B-Instruct does), gradient
checkpointing, and DistributedDataParallel / torchrun with the gloo backend."""
import copy
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zlib

import pytest
import torch

import eval as evaluation
import igpo
import sft
from conftest import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                  "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}


def one_line_exit(excinfo):
    """The scripts' contract for bad input: SystemExit carrying a single 'error: ...' line."""
    msg = str(excinfo.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def toy_batch(tokenizer, questions, G, L, seed=0):
    """Prompts (B token-id lists, unpadded) and random completions (B*G, L) of ordinary tokens."""
    prompts = [tokenizer(sft.make_prompt(tokenizer, q, True), add_special_tokens=False).input_ids for q in questions]
    g = torch.Generator().manual_seed(seed)
    return prompts, torch.randint(len(sft.SPECIAL_TOKENS), len(tokenizer), (len(questions) * G, L), generator=g)


QUESTIONS = ["Ann has 3 pens. How many pens now?", "Jo has 41 eggs. Sells 9. How many eggs now?",
             "Kim has 7 cards. Doubles them. How many cards now?", "Max has 12 rocks. Finds 5 more. How many rocks now?"]


# ---------------------------------------------------------------------------------------------------------
# 1. LoRA: only adapters train, and the KL reference is the base model with the adapter switched off.

def test_lora_trains_only_adapters_and_reference_is_base(tokenizer, facts):
    G, L = 2, 8
    base = tiny_model(tokenizer)
    model = sft.add_lora(copy.deepcopy(base), 4, 8, facts.lora_targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # every projection the embedded model has (Wqkv, Wo, Wi) got an adapter
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"Wqkv", "Wo", "Wi"}

    prompts, completions = toy_batch(tokenizer, QUESTIONS[:2], G, L)

    def reference():  # as igpo.main computes pi_ref under --lora_r
        with torch.no_grad(), igpo.trained_adapter_off(model):
            return igpo.token_logps(model, prompts, completions, facts)

    with torch.no_grad():
        logp_base = igpo.token_logps(base.eval(), prompts, completions, facts)
    model.eval()
    assert torch.equal(reference(), logp_base)

    # one optimizer step on the IGPO loss, set up as in igpo.main
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    logp = igpo.token_logps(model, prompts, completions, facts)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _, _ = igpo.grpo_loss(logp, logp.detach(), logp_base, adv, torch.ones_like(logp, dtype=torch.bool), 0.2, 0.01)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert not torch.equal(igpo.token_logps(model, prompts, completions, facts), logp_base)
    assert torch.equal(reference(), logp_base)  # the trained adapter does not leak into the reference


def test_lora_without_known_targets_is_one_line_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(SystemExit) as e:
        sft.add_lora(model, 4, 8, ("q_proj",))
    assert "no Linear layer named q_proj" in one_line_exit(e)


# ---------------------------------------------------------------------------------------------------------
# 2. --trust_remote_code: a model that ships its own code, laid out like LLaDA-8B-Instruct on the hub
#    (config.json auto_map -> configuration_*.py / modeling_*.py, the model class imports its config relatively).

SENTINEL_SRC = '''
with open({sentinel!r}, "a") as f:  # lets the test see whether this file was ever executed
    f.write(__name__ + "\\n")
'''

CONFIG_SRC = SENTINEL_SRC + '''
from transformers import PretrainedConfig


class ToyLLaDAConfig(PretrainedConfig):
    model_type = "toy_llada"

    def __init__(self, vocab_size=128, d_model=32, n_layers=2, mask_token_id=None, **kwargs):
        self.vocab_size, self.d_model, self.n_layers, self.mask_token_id = vocab_size, d_model, n_layers, mask_token_id
        super().__init__(**kwargs)
'''

MODELING_SRC = SENTINEL_SRC + '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_toyllada import ToyLLaDAConfig


class ToyLLaDAModelLM(PreTrainedModel):
    config_class = ToyLLaDAConfig

    def __init__(self, config):
        super().__init__(config)
        self.wte = torch.nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(2 * config.d_model, config.d_model)
                                          for _ in range(config.n_layers))
        self.lm_head = torch.nn.Linear(config.d_model, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.wte(input_ids)
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask)[..., None].to(h.dtype)
        for block in self.blocks:  # bidirectional: each position mixes in the mean of the whole sequence
            ctx = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
            h = h + torch.tanh(block(torch.cat([h, ctx.expand_as(h)], -1)))
        return CausalLMOutputWithPast(logits=self.lm_head(h))
'''


def test_trust_remote_code_loader(tokenizer, tmp_path, monkeypatch):
    # a new model type gets its entry in sft.MODELS, the one place a port edits: LLaDA's conventions here
    monkeypatch.setitem(sft.MODELS, "toy_llada", sft.MODELS["llada"])
    path, sentinel = tmp_path / "toyllada", tmp_path / "remote_code_ran"
    path.mkdir()
    (path / "configuration_toyllada.py").write_text(CONFIG_SRC.format(sentinel=str(sentinel)))
    (path / "modeling_toyllada.py").write_text(MODELING_SRC.format(sentinel=str(sentinel)))
    sys.path.insert(0, str(tmp_path))
    try:  # build and save the checkpoint with the very classes that will ship in the folder
        modeling = importlib.import_module("toyllada.modeling_toyllada")
        torch.manual_seed(0)
        original = modeling.ToyLLaDAModelLM(modeling.ToyLLaDAConfig(
            vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id)).eval()
        with torch.no_grad():
            for p in original.parameters():
                p.normal_(0, 1.0)  # peaked predictions, so a re-initialised model would be obvious
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("toyllada")]:
            del sys.modules[name]
    original.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_toyllada.ToyLLaDAConfig",  # LLaDA's auto_map keys
                          "AutoModel": "modeling_toyllada.ToyLLaDAModelLM",
                          "AutoModelForCausalLM": "modeling_toyllada.ToyLLaDAModelLM"}
    (path / "config.json").write_text(json.dumps(config))
    sentinel.unlink()

    # without the flag: a one-line refusal, and the folder's code never runs
    with pytest.raises(SystemExit) as e:
        sft.load_model(str(path))
    msg = one_line_exit(e)
    assert "custom code" in msg and "--trust_remote_code" in msg  # names the problem and the flag
    assert not sentinel.exists()

    model, tok, facts = sft.load_model(str(path), trust_remote_code=True)  # the path LLaDA-8B-Instruct takes
    ran = sentinel.read_text().split()
    assert any(m.endswith("configuration_toyllada") for m in ran) and any(m.endswith("modeling_toyllada") for m in ran)
    assert type(model).__name__ == "ToyLLaDAModelLM" and type(model).__module__.endswith("modeling_toyllada")
    model.eval()
    prompts = torch.tensor(toy_batch(tok, QUESTIONS[:1], 1, 1)[0] * 3)
    with torch.no_grad():  # the saved weights came back, not a fresh initialisation
        assert torch.equal(model(prompts).logits, original(prompts).logits)
    sampler = evaluation.Sampler(16, 8, 8, 0.0)
    out = evaluation.generate(model, prompts, sampler, facts)
    assert out.shape == (3, prompts.shape[1] + 16) and torch.equal(out[:, :prompts.shape[1]], prompts)
    assert not (out == tok.mask_token_id).any()
    assert torch.equal(out, evaluation.generate(original, prompts, sampler, facts))


# ---------------------------------------------------------------------------------------------------------
# 3. Gradient checkpointing: same numbers, less memory; a clear error where the model cannot do it.

def loss_and_grads(model, facts, prompts, completions):
    model.zero_grad(set_to_none=True)
    logp = igpo.token_logps(model, prompts, completions, facts)
    adv = torch.linspace(-1, 1, logp.shape[0])
    loss, _, _ = igpo.grpo_loss(logp, logp.detach() - 0.05, logp.detach() + 0.05, adv,
                                torch.ones_like(logp, dtype=torch.bool), 0.2, 0.01)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
def test_grad_ckpt_same_loss_and_grads(tokenizer, facts, lora):
    G = 2
    prompts, completions = toy_batch(tokenizer, QUESTIONS[:2], G, 8)
    plain, ckpt = tiny_model(tokenizer), tiny_model(tokenizer)
    sft.enable_grad_ckpt(ckpt)  # before LoRA, the order igpo.main and sft.main use
    if lora:  # adapters get the same (random) init: LoRA B is zero, so perturb it identically
        targets = facts.lora_targets
        plain, ckpt = sft.add_lora(plain, 4, 8, targets, dropout=0.0), sft.add_lora(ckpt, 4, 8, targets, dropout=0.0)
        for m in (plain, ckpt):
            torch.manual_seed(1)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_" in n:
                        p.normal_(0, 0.1)
    plain.train(), ckpt.train()  # checkpointing is only active in training mode
    layer = (ckpt.base_model.model if lora else ckpt).model.layers[0]
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop before the end
    loss0, grads0 = loss_and_grads(plain, facts, prompts, completions)
    loss1, grads1 = loss_and_grads(ckpt, facts, prompts, completions)
    groups = len({len(p) for p in prompts})  # prompts of one length share a forward pass
    assert len(calls) == 2 * groups  # the layer really was recomputed during backward
    assert torch.allclose(loss0, loss1, atol=1e-5)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-5), n
    if lora:
        assert all(g.abs().sum() > 0 for n, g in grads1.items() if "lora_" in n)


def test_grad_ckpt_unsupported_is_one_line_error():
    from transformers import PretrainedConfig, PreTrainedModel

    class NoCkpt(PreTrainedModel):
        config_class = PretrainedConfig
        supports_gradient_checkpointing = False

        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(SystemExit) as e:
        sft.enable_grad_ckpt(NoCkpt(PretrainedConfig()))
    assert "NoCkpt" in one_line_exit(e)


# ---------------------------------------------------------------------------------------------------------
# 4. DistributedDataParallel over gloo processes, launched with torchrun as on a multi-GPU node.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           script, *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def ddp_worker(rank, world, port, init, batch, out):
    """One of `world` processes: its half of the prompts, the model in DDP, gradients written to out."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what torchrun would set
    rank, world, _ = sft.init_distributed("cpu")
    model, _, facts = sft.load_model(init)
    d = torch.load(batch)
    model.eval()
    ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)  # as sft.setup_model
    B, G = len(d["prompts"]) // world, d["G"]
    b, s = slice(rank * B, (rank + 1) * B), slice(rank * B * G, (rank + 1) * B * G)  # this rank's prompts
    logp = igpo.token_logps(ddp, d["prompts"][b], d["completions"][s], facts)
    loss, _, _ = igpo.grpo_loss(logp, d["logp_old"][s], d["logp_ref"][s], d["adv"][s], d["loss_mask"][s], 0.2, 0.04)
    loss.backward()  # DDP averages the gradients over ranks here
    torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out, f"grad{rank}.pt"))
    # a clean exit: both ranks done, DDP's reducer gone, then the group (gloo threads left running while the
    # interpreter shuts down can abort the process, a failure of the harness and not of the gradient)
    torch.distributed.barrier()
    del ddp
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradient_equals_full_batch(tokenizer, facts, tmp_path):
    G, L = 2, 8
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    prompts, completions = toy_batch(tokenizer, QUESTIONS, G, L)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logp0 = igpo.token_logps(model, prompts, completions, facts)
    n = logp0.shape[0]
    loss_mask = torch.rand(n, L, generator=g) < 0.7
    loss_mask[: n // 2, L // 2:] = False  # rank 0 holds fewer loss tokens than rank 1, on purpose
    d = {"prompts": prompts, "completions": completions, "G": G,
         "logp_old": logp0 + 0.2 * torch.randn(n, L, generator=g), "logp_ref": logp0 + 0.2 * torch.randn(n, L, generator=g),
         "adv": torch.randn(n, generator=g), "loss_mask": loss_mask}
    torch.save(d, tmp_path / "batch.pt")
    # spawned, not forked: a fork after other tests have started threads (tokenizers, the grader) can hang
    procs = torch.multiprocessing.start_processes(
        ddp_worker, (2, free_port(), str(tmp_path / "init"), str(tmp_path / "batch.pt"), str(tmp_path)),
        nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not procs.join(timeout=1):  # raises if a worker failed
        if time.time() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 120 s")

    # the same loss on the full batch in one process
    logp = igpo.token_logps(model, prompts, completions, facts)
    loss, _, _ = igpo.grpo_loss(logp, d["logp_old"], d["logp_ref"], d["adv"], loss_mask, 0.2, 0.04)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert max(v.abs().max() for v in ref.values()) > 0
    for rank in range(2):
        grads = torch.load(tmp_path / f"grad{rank}.pt")
        assert grads.keys() == ref.keys()
        for name in ref:
            assert torch.allclose(grads[name], ref[name], rtol=1e-4, atol=1e-6), (rank, name)


@pytest.fixture(scope="module")
def tiny_ckpt(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Runs igpo.main and writes, per rank and step, the questions that rank rolled out (igpo.make_prompt is called
# once per rollout prompt; evaluation prompts go through eval's own binding of it).
SPY_IGPO = """
import json, os, sys
import igpo
real, log = igpo.make_prompt, os.path.join({log!r}, "rank" + os.environ.get("RANK", "0") + ".jsonl")
def spy(tokenizer, question, toy):
    with open(log, "a") as f:
        f.write(json.dumps(question) + "\\n")
    return real(tokenizer, question, toy)
igpo.make_prompt = spy
igpo.main(sys.argv[1:])
"""


def rolled_out(log_dir, rank, per_step):
    """The questions one rank rolled out, one list per step."""
    qs = [json.loads(line) for line in open(log_dir / f"rank{rank}.jsonl")]
    return [qs[k:k + per_step] for k in range(0, len(qs), per_step)]


TWO_PROCESS_FLAGS = ["--max_steps", 2, "--batch_prompts", 4, "--grad_accum", 2, "--num_generations", 4,
                     "--gen_length", 16, "--block_length", 8, "--diffusion_steps", 8, "--limit", 0, "--device", "cpu"]


@pytest.fixture(scope="module")
def two_process_run(tiny_ckpt, tmp_path_factory):
    """The same 2-step IGPO run under torchrun with 2 processes and in one process, each logging the questions
    it rolled out: (folder of the 2-process run, questions per step alone, questions per rank per step)."""
    root = tmp_path_factory.mktemp("two_process")
    flags = ["--model", tiny_ckpt, *TWO_PROCESS_FLAGS]
    for name in ("two", "one"):
        (root / name).mkdir()
        (root / f"spy_{name}.py").write_text(SPY_IGPO.format(log=str(root / name)))
    torchrun(str(root / "spy_two.py"), *flags, "--out_dir", root / "igpo")
    r = subprocess.run([sys.executable, str(root / "spy_one.py"), *map(str, flags), "--out_dir", str(root / "igpo1")],
                       cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "igpo", rolled_out(root / "one", 0, 4), [rolled_out(root / "two", rank, 2) for rank in (0, 1)]


@pytest.mark.slow
def test_torchrun_igpo_two_processes(two_process_run):
    # --batch_prompts and --grad_accum count the whole step: 2 processes split the 4 prompts of a step 2 + 2,
    # disjoint, and together they roll out exactly the prompts one process rolls out alone (not 2 x 4 prompts)
    out, one, ranks = two_process_run
    assert len(one) == 2 and all(len(steps) == 2 for steps in ranks)
    for step in range(2):
        mine, theirs = ranks[0][step], ranks[1][step]
        assert not set(mine) & set(theirs)  # no prompt rolled out twice in a step
        assert mine + theirs == one[step]  # rank r takes the r-th share of the step's batch
    assert one[0] != one[1]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]  # held-out row at step 0, one per step, by rank 0 only
    assert set(rows[0]) == {"step", "heldout"}
    model, _, _ = sft.load_model(str(out))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2  # both ranks' RNG streams saved for a resume


@pytest.mark.slow
def test_torchrun_resume_loads_the_saved_state_onto_the_cpu(two_process_run, tiny_ckpt, tmp_path):
    # On GPUs rank 0 saves state.pt from cuda:0. Loaded without a map location, every rank would rebuild those
    # tensors on GPU 0 (on a CPU machine: refuse to load them at all). Retag this run's state as cuda:0 tensors,
    # then resume it with 2 processes: each must load it onto the CPU and continue.
    from torch import serialization
    out = tmp_path / "igpo"
    shutil.copytree(two_process_run[0], out)
    state = torch.load(out / "state.pt", weights_only=True)
    tag = (0, lambda storage: "cuda:0", lambda obj, location: None)  # asked first: every storage is cuda:0's
    serialization._package_registry.insert(0, tag)
    try:
        torch.save(state, out / "state.pt")
    finally:
        serialization._package_registry.remove(tag)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file now names a GPU
        torch.load(out / "state.pt", weights_only=True)
    flags = [str(f) for f in TWO_PROCESS_FLAGS]
    flags[flags.index("--max_steps") + 1] = "3"
    r = torchrun("igpo.py", "--model", tiny_ckpt, *flags, "--out_dir", out, "--resume")
    assert "resumed" in r.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


# Runs sft.main and writes, per rank, the index k of every micro-batch it trained on (sft.batch_at(rows, size, k)).
SPY_SFT = """
import os, sys
import sft
real, log = sft.batch_at, os.path.join({log!r}, "rank" + os.environ.get("RANK", "0") + ".txt")
def spy(rows, size, k, seed):
    with open(log, "a") as f:
        f.write(str(k) + "\\n")
    return real(rows, size, k, seed)
sft.batch_at = spy
sft.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_sft_splits_each_steps_micro_batches(tmp_path):
    # --grad_accum counts the step's micro-batches: 2 processes take 2 + 2 of the 4, disjoint, the same 4 that
    # one process trains on (not 2 x 4)
    flags = ["--toy_size", 64, "--batch_size", 4, "--grad_accum", 4, "--max_steps", 2, "--stop_all_wrong", 0,
             "--device", "cpu"]
    for name in ("two", "one"):
        (tmp_path / name).mkdir()
        (tmp_path / f"spy_{name}.py").write_text(SPY_SFT.format(log=str(tmp_path / name)))
    torchrun(str(tmp_path / "spy_two.py"), *flags, "--out_dir", tmp_path / "sft2")
    r = subprocess.run([sys.executable, str(tmp_path / "spy_one.py"), *map(str, flags), "--out_dir",
                        str(tmp_path / "sft1")], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ks = {name: [[int(k) for k in open(tmp_path / name / f"rank{rank}.txt")] for rank in ranks]
          for name, ranks in (("one", [0]), ("two", [0, 1]))}
    assert ks["one"] == [list(range(8))]  # 2 steps x 4 micro-batches
    mine, theirs = ks["two"]
    assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)
    for step in range(2):  # each step: the ranks' micro-batches are the step's, and only the step's
        assert sorted(mine[2 * step:2 * step + 2] + theirs[2 * step:2 * step + 2]) == list(range(4 * step, 4 * step + 4))


@pytest.mark.slow
def test_torchrun_ranks_may_make_different_numbers_of_forward_passes(tmp_path):
    # A micro-batch runs one forward per prompt length in it (no padding), so the ranks of a step make different
    # numbers of forwards before their backward. A DDP forward that talks to the other ranks (DDP's default
    # broadcasts the module's buffers: the embedded ModernBERT and Dream have some) then waits forever.
    rows = [{"question": " ".join(["Ann has 3 coins."] * n), "trace": "3+1=4\n\\boxed{4}"} for n in (1, 2, 3) * 4]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torchrun("sft.py", "--dataset", tmp_path / "rows.jsonl", "--gen_length", 16, "--batch_size", 4, "--grad_accum", 2,
             "--max_steps", 4, "--device", "cpu", "--out_dir", tmp_path / "sft", timeout=120)
    assert (tmp_path / "sft" / "model.safetensors").exists()


@pytest.mark.slow
def test_torchrun_needs_the_step_split_evenly(tiny_ckpt, tmp_path):
    # a step whose micro-batches cannot be shared equally is refused with one line, before any folder is touched
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "igpo.py", "--model", str(tiny_ckpt), "--batch_prompts", "4", "--grad_accum", "1", "--device", "cpu",
           "--out_dir", str(tmp_path / "igpo")]
    r = subprocess.run(cmd, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and not (tmp_path / "igpo").exists()
    assert "error: --grad_accum (1) must be a multiple of the number of processes (2)" in r.stderr


@pytest.mark.slow
def test_torchrun_eval_matches_single_process(tiny_ckpt, tmp_path):
    # gen_batch 1: each question is sampled alone in both runs, so any difference comes from the sharding
    # and gathering of questions over ranks, not from float noise of different left padding
    flags = ["--model", tiny_ckpt, "--task", "toy", "--limit", 6, "--gen_length", 16, "--block_length", 8,
             "--diffusion_steps", 8, "--gen_batch", 1, "--device", "cpu"]
    torchrun("eval.py", *flags, "--out_dir", tmp_path / "two")
    evaluation.main([str(f) for f in flags] + ["--out_dir", str(tmp_path / "one")])
    one, two = (json.load(open(tmp_path / d / "eval_toy.json")) for d in ("one", "two"))
    assert len(one["generations"]) == 6
    assert [r["question"] for r in two["generations"]] == [q for q, _ in evaluation.load_task("toy", limit=6)]
    for key in ["question", "generations", "correct"]:
        assert [r[key] for r in two["generations"]] == [r[key] for r in one["generations"]], key
    assert two["metrics"] == one["metrics"]


# ---------------------------------------------------------------------------------------------------------
# 5. The batch rule of torchrun, fast: the process group faked inside one process. Each "rank" runs main() with
#    torch.distributed's collectives replaced by their one-process meaning; the rank's gradient is recorded
#    where the optimizer steps (no clip), and the average over ranks, which DDP would form inside backward(),
#    must be the one-process gradient of the whole batch. Rollouts and SFT noise are made functions of the
#    rows themselves, so that what a rank draws is the only difference.

def fake_rank(monkeypatch, rank, world):
    monkeypatch.setattr(sft, "init_distributed", lambda device="auto": (rank, world, torch.device("cpu")))
    monkeypatch.setattr(sft, "rank_and_world", lambda: (rank, world))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda module, **k: module)  # averaged below
    monkeypatch.setattr(sft, "checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(sft.dist, "barrier", lambda: None)
    monkeypatch.setattr(igpo, "mean_over_ranks", lambda means, counts, world, device: (means, counts))


def gradients_at_the_step(monkeypatch):
    """The gradient each optimizer step applies, {name-less index: tensor}, in call order."""
    seen, step = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return seen


def rollout_of_the_prompts(model, prompts, sampler, facts, gen, hints=None):
    """A stand-in rollout whose i-th sample of a prompt is a function of the prompt and i only (not of the rank's
    generator)."""
    rows = []
    for j, p in enumerate(prompts):
        i = prompts[:j].count(p)  # which sample of this prompt
        rows.append(torch.randint(7, 200, (sampler.gen_length,), generator=torch.Generator().manual_seed(sum(p) + i)))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def rl_rows(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    tiny_model(tokenizer).save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    ds = sft.toy_dataset("train", 8, seed="ranks")
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps({"question": r["question"], "trace": r["trace"]}) + "\n" for r in ds)
    return root


def alone_and_as_two_ranks(monkeypatch, main, module, spied, flags, out):
    """main(flags) in one process, then as rank 0 and as rank 1 of two: for each run, the arguments of every call
    of module.<spied> (what that rank drew) and the gradient of its first optimizer step."""
    runs = []
    for rank, world in [(0, 1), (0, 2), (1, 2)]:
        with monkeypatch.context() as m:
            if world > 1:
                fake_rank(m, rank, world)
            grads, calls, real = gradients_at_the_step(m), [], getattr(module, spied)
            m.setattr(module, spied, lambda *a, real=real: calls.append(a) or real(*a))
            main(flags + ["--out_dir", str(out / f"r{rank}w{world}")])
        runs.append((calls, grads[0]))
    return runs


def assert_the_ranks_average_to_the_whole(runs):
    (_, whole), (_, mine), (_, theirs) = runs
    assert any(g.abs().sum() > 0 for g in whole)
    for g, a, b in zip(whole, mine, theirs):  # what DDP's average of the two ranks would apply
        assert torch.allclose((a + b) / 2, g, rtol=1e-4, atol=1e-7)


def test_each_rank_trains_its_share_and_the_average_is_the_whole_batch(rl_rows, tmp_path, monkeypatch):
    flags = ["--model", str(rl_rows / "init"), "--dataset", str(rl_rows / "rows.jsonl"), "--batch_prompts", "4",
             "--grad_accum", "4", "--num_generations", "4", "--gen_length", "16", "--block_length", "8",
             "--diffusion_steps", "8", "--max_steps", "1", "--num_iterations", "1", "--no_inpaint", "--limit", "0",
             "--grad_clip", "1e9", "--lr", "0"]
    monkeypatch.setattr(igpo, "rollout", rollout_of_the_prompts)
    monkeypatch.setattr(igpo, "grade", lambda text, gold, task: zlib.crc32(text.encode()) % 2 == 0)
    runs = alone_and_as_two_ranks(monkeypatch, igpo.main, igpo, "make_prompt", flags, tmp_path)
    whole, mine, theirs = ([question for _, question, _ in calls] for calls, _ in runs)
    assert len(mine) == len(theirs) == 2 and mine + theirs == whole  # each rank: its own 2 of the step's 4
    assert_the_ranks_average_to_the_whole(runs)


def test_each_sft_rank_trains_its_micro_batches_and_the_average_is_the_whole_step(tmp_path, monkeypatch):
    flags = ["--toy_size", "64", "--batch_size", "2", "--grad_accum", "4", "--max_steps", "1", "--stop_all_wrong", "0",
             "--grad_clip", "1e9", "--lr", "0", "--device", "cpu"]
    real_loss = sft.sft_loss  # its noise made a function of the micro-batch, not of the rank's generator
    monkeypatch.setattr(sft, "sft_loss", lambda model, rows, facts, gen: real_loss(
        model, rows, facts, torch.Generator().manual_seed(sum(map(sum, (r[0] + r[1] for r in rows))))))
    runs = alone_and_as_two_ranks(monkeypatch, sft.main, sft, "batch_at", flags, tmp_path)
    whole, mine, theirs = ([k for _, _, k, _ in calls] for calls, _ in runs)
    assert whole == [0, 1, 2, 3] and sorted(mine + theirs) == whole and len(mine) == 2
    assert_the_ranks_average_to_the_whole(runs)


# ---------------------------------------------------------------------------------------------------------
# 6. tests/gpu_check.py, the one command that checks the GPU path: it skips cleanly without CUDA, and its checks
#    run on the CPU at toy sizes, so that the script cannot rot between the GPU sessions that run it.

def test_a_ddp_forward_waits_on_no_other_rank(tmp_path, monkeypatch):
    """The rule behind test_torchrun_ranks_may_make_different_numbers_of_forward_passes, fast: the DDP model that
    setup_model builds runs a forward without any collective (DDP's default broadcasts the module's buffers in
    each one, and the embedded model has rotary buffers), in a real one-process gloo group."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(sft, "rank_and_world", lambda: (0, 2))  # wrap in DDP, as under torchrun
        args = sft.get_args(["--device", "cpu", "--out_dir", str(tmp_path / "run")])
        _, model, _, _, _, _ = sft.setup_model(args, torch.device("cpu"), None)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel) and list(model.module.buffers())
        calls = []
        monkeypatch.setattr(dist, "_broadcast_coalesced", lambda *a: calls.append(a))
        model(torch.tensor([[9, 10, 11, 12]])).logits.sum().backward()
        assert calls == []
    finally:
        dist.destroy_process_group()


def test_gpu_check_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: gpu_check.py would run, not skip")
    r = subprocess.run([sys.executable, "tests/gpu_check.py"], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "skipped" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_gpu_check_runs_its_checks_on_the_cpu():
    r = subprocess.run([sys.executable, "tests/gpu_check.py", "--device", "cpu"], cwd=ROOT, env=SUBPROCESS_ENV,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gpu_check: 3 of 3 checks passed" in r.stdout
    assert "killed after step 2 and resumed: weights identical True" in r.stdout
