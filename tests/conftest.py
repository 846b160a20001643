"""Shared test setup: import the scripts from the repo root, keep the hubs offline, and build tiny models."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tests fork and spawn processes
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import sft  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures")


@pytest.fixture(scope="session")
def tokenizer():
    return sft.build_toy_tokenizer()


def tiny_model(tokenizer, seed=0, hidden=32, layers=2):
    """A random embedded-architecture model, small enough for tests to run in milliseconds. Weights are
    scaled up so that its predictions are peaked, i.e. confidences are well separated."""
    torch.manual_seed(seed)
    model = sft.build_toy_model(tokenizer, hidden=hidden, layers=layers, heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_model(tokenizer)


LLADA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada")  # vendored hub files (README there)


def build_tiny_llada(path, d_model=32, n_layers=2, seed=0):
    """A tiny random LLaDA-8B-Instruct in a save_pretrained folder, loaded exactly as the hub model is
    (trust_remote_code, auto_map -> the vendored modeling_llada.py): the real classes, the real vocabulary
    (126,464 rows) and special-token ids, only d_model / layers / heads / MLP width shrunk. The tokenizer is
    one token per character at low ids plus LLaDA's special tokens at their real ids."""
    import json
    import shutil
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    os.makedirs(path, exist_ok=True)
    for name in ("modeling_llada.py", "configuration_llada.py"):
        shutil.copy(os.path.join(LLADA_DIR, name), path)
    tok_config = json.load(open(os.path.join(LLADA_DIR, "tokenizer_config.json")))
    special = {v["content"]: int(k) for k, v in tok_config["added_tokens_decoder"].items()}  # real ids
    config = json.load(open(os.path.join(LLADA_DIR, "config.json")))
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    taken = {**{c: i for i, c in enumerate(chars)}, **special}  # characters at ids 0..95, special tokens real
    # every other id gets a placeholder, so the tokenizer has LLaDA's 126,464 ids like the embedding
    ids = set(taken.values())
    vocab = {**{f"<r{i}>": i for i in range(config["vocab_size"]) if i not in ids}, **taken}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = tok_config["chat_template"]
    config.update(d_model=d_model, n_layers=n_layers, n_heads=2, n_kv_heads=2, mlp_hidden_size=2 * d_model,
                  max_sequence_length=1024)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    # the folder's own class, imported the way trust_remote_code imports it, creates and saves the weights
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    torch.manual_seed(seed)
    cls = get_class_from_dynamic_module("modeling_llada.LLaDAModelLM", path)
    model = cls(cls.config_class.from_pretrained(path))
    with torch.no_grad():  # the hub class leaves its weights uninitialised (init_params=False): fill them
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 if p.dim() > 1 else torch.ones_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    """Path of a tiny random LLaDA checkpoint (build_tiny_llada), built once per session."""
    return build_tiny_llada(str(tmp_path_factory.mktemp("llada") / "tiny_llada"))
