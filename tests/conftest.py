"""Shared fixtures: small random configs and the bundled models."""

from __future__ import annotations

import os

import pytest
import torch

from inferlab import ModelArgs, Transformer

# Without a GPU the labs' Triton kernels run in Triton's interpreter. Triton decides at import time whether its
# own helpers (tl.max, tl.sum: jit functions) are interpreted, so the variable must be set before any test
# imports triton, or a kernel run later in this process fails ("Cannot call @triton.jit'd outside of the scope
# of a kernel").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


def check_batch(lab, notebooks, tmp_path_factory, seed_offset: int = 0) -> dict:
    """A lab's variants through the real check stage (bubblewrap, one thread), once per test module:
    {name: (points by task, results by task, names the learner's process replaced)}.

    `notebooks` maps a name to a prepared notebook, or to a function that returns one; each variant gets its
    own seeds (1000 apart), so no two variants are graded on the same drawn inputs."""
    from grader import check_stage
    from grader.sandbox import Limits

    out = {}
    for i, (name, nb) in enumerate(notebooks.items()):
        seeds = {t.id: 1000 * i + n + seed_offset for n, t in enumerate(lab.spec.tasks)}
        nb = nb() if callable(nb) else nb
        outcomes, tampered = check_stage.run(lab, nb, "bwrap", Limits(threads=1), seeds, tmp_path_factory.mktemp(name))
        out[name] = ({o.task: o.points for o in outcomes}, {o.task: o.result for o in outcomes}, tampered)
    return out
