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
