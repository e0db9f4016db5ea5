"""Shared fixtures: small random configs and the bundled models."""

from __future__ import annotations

import pytest
import torch

from inferlab import ModelArgs, Transformer


def small_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return ModelArgs(**{**base, **overrides})


def random_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(small_args(**overrides))
    with torch.no_grad():
        for p in model.parameters():  # default init leaves norms at 1 and biases small; randomise all
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny():
    from inferlab import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from inferlab import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session", autouse=True)
def private_inferlab_home(tmp_path_factory):
    """Track starts and self-check records go to a temporary folder, never the developer's ~/.inferlab
    (kernels started by the tests inherit this environment)."""
    import os

    home = tmp_path_factory.mktemp("inferlab-home")
    old = os.environ.get("INFERLAB_HOME")
    os.environ["INFERLAB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("INFERLAB_HOME", None)
    else:
        os.environ["INFERLAB_HOME"] = old
