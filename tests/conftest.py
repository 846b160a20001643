"""Shared test setup: import the scripts from the repo root, keep the hubs offline, and build tiny models."""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tests fork and spawn processes
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import sft  # noqa: E402


def pytest_configure(config):
    # `pytest -m "not slow" tests` is the everyday run (under 3 minutes on 2 cores); the full suite, which CI
    # runs, adds these: the default SFT to its stop rule, SIGKILL resumes, torchrun, the README chains
    config.addinivalue_line("markers", "slow: a long end-to-end run, left out of the everyday command")


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


@pytest.fixture(scope="session")
def facts(model, tokenizer):
    """The embedded model's entry of sft.MODELS, resolved to token ids (what load_model returns with it)."""
    return sft.model_facts(model.config, tokenizer)


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


DREAM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dream")  # vendored hub files (README there)
REMOTE_CODE = ("configuration_dream.py", "modeling_dream.py", "generation_utils.py")


def build_tiny_dream_tokenizer(vendor_dir=None):
    """Dream's special tokens at their real ids plus a character-level tokenizer for ordinary text, with
    Dream's chat template. A PreTrainedTokenizerFast: AutoTokenizer loads it without trust_remote_code."""
    vendor_dir = vendor_dir or DREAM_DIR
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok_config = json.load(open(os.path.join(vendor_dir, "tokenizer_config.json")))
    added = {int(k): v for k, v in tok_config["added_tokens_decoder"].items()}  # real id -> entry
    special = {v["content"]: i for i, v in added.items()}
    first_added = min(added)  # 151643: Dream's byte-level BPE vocabulary holds ids 0..151642
    # printable ASCII at the ids Dream's byte-level BPE gives a lone character: '!'..'~' -> 0..93 (so digits
    # '0'..'9' are 15..24 in both), space 220 ('Ġ'), newline 198 ('Ċ')
    chars = {chr(b): b - 33 for b in range(33, 127)}
    chars.update({" ": 220, "\n": 198})
    vocab = {f"<r{i}>": i for i in range(first_added) if i not in chars.values()}  # placeholders fill the rest
    vocab.update(chars)
    # Dream's byte-level BPE has no unknown token; here any other character becomes the placeholder <r94>
    # (94 is the first byte-level id past printable ASCII)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<r94>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # the added tokens, in id order, take ids 151643..151666 as in the hub tokenizer (vocab_size 151,643 without
    # them, len() 151,667 with them); same split: 14 are "special" (dropped by skip_special_tokens), 8 are not
    # (<tool_call>, </tool_call>, the fim / repo / file tokens); all are matched before the text is split
    tok.add_tokens([AddedToken(v["content"], special=v["special"], normalized=False)
                    for _, v in sorted(added.items())])
    assert all(tok.token_to_id(t) == i for t, i in special.items()), "added tokens must land on their real ids"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=tok_config["bos_token"], eos_token=tok_config["eos_token"],
        pad_token=tok_config["pad_token"], mask_token=tok_config["mask_token"],
        additional_special_tokens=tok_config["additional_special_tokens"],
        clean_up_tokenization_spaces=False, model_max_length=tok_config["model_max_length"])
    tokenizer.chat_template = tok_config["chat_template"]
    return tokenizer


def build_tiny_dream(path, hidden=64, layers=2, seed=0, std=0.5, vendor_dir=None):
    """A tiny random Dream-v0-Instruct-7B in a save_pretrained folder, loaded exactly as the hub model is
    (trust_remote_code, auto_map -> the vendored modeling_dream.py). Returns path.

    std: every weight matrix (embedding, projections, head) is drawn N(0, std^2), norms are ones, biases zeros,
    so that predictions are peaked and confidences separate (as build_tiny_llada's 0.5). std=None keeps Dream's
    own initialisation (_init_weights: N(0, 0.02^2)), which is the better start for training experiments."""
    vendor_dir = vendor_dir or DREAM_DIR
    assert hidden % 4 == 0, "4 attention heads (2 key/value heads)"
    os.makedirs(path, exist_ok=True)
    for name in REMOTE_CODE:
        shutil.copyfile(os.path.join(vendor_dir, name), os.path.join(path, name))
    config = json.load(open(os.path.join(vendor_dir, "config.json")))
    config.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_window_layers=layers,
                  torch_dtype="float32")  # the weights are written in float32 (the hub's are bfloat16)
    config.pop("_name_or_path", None)
    json.dump(config, open(os.path.join(path, "config.json"), "w"), indent=2)
    # the folder's own class, imported the way trust_remote_code imports it, creates and saves the weights
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    torch.manual_seed(seed)
    cls = get_class_from_dynamic_module("modeling_dream.DreamModel", path)
    model = cls(cls.config_class.from_pretrained(path))
    if std is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std)
                elif n.endswith("bias"):
                    p.zero_()
                else:  # RMSNorm weights
                    p.fill_(1.0)
    model.save_pretrained(path)
    # save_pretrained wrote a plain GenerationConfig (the class counts as able to generate because the name
    # DreamGenerationMixin contains "GenerationMixin"); put the hub's file back, which DreamModel.from_pretrained
    # reads into a DreamGenerationConfig (steps 512, alg origin, eps 1e-3, temperature 0, mask_token_id null)
    shutil.copyfile(os.path.join(vendor_dir, "generation_config.json"), os.path.join(path, "generation_config.json"))
    build_tiny_dream_tokenizer(vendor_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    """Path of a tiny random Dream-v0-Instruct-7B checkpoint (build_tiny_dream), built once per session."""
    return build_tiny_dream(str(tmp_path_factory.mktemp("dream") / "tiny_dream"), hidden=32)
