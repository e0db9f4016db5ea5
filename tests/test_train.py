"""Training is deterministic and resumable; the bundled models' cards carry measured numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inferlab.loading import BUNDLED_DIR
from inferlab.train import TrainConfig, lr_at, train_model, unigram_perplexity

from conftest import small_args


def stream() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 97, 5000).astype(np.uint16)


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup=2, bf16_autocast=False, checkpoint_every=2)
    straight, _ = train_model("t", small_args(), cfg, stream(), tmp_path / "a", log=lambda *a: None)
    train_model("t", small_args(), cfg, stream(), tmp_path / "b", log=lambda *a: None, stop_at=3)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed, stats = train_model("t", small_args(), cfg, stream(), tmp_path / "b", log=lambda *a: None)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert stats["tokens_seen"] == 6 * 2 * 16


def test_training_reduces_loss(tmp_path):
    # A stream with structure (a repeated pattern) must be learnt quickly.
    data = np.tile(np.arange(20, dtype=np.uint16), 300)
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=32, warmup=5, lr=1e-2, bf16_autocast=False)
    model, _ = train_model("t", small_args(), cfg, data, tmp_path, log=lambda *a: None)
    x = torch.from_numpy(data[:33].astype(np.int64))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x[None, :-1])[0], x[1:])
    assert loss < 0.5


def test_lr_schedule():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(999, cfg) == pytest.approx(1e-4, rel=0.01)


def test_unigram_baseline():
    train = np.array([0, 0, 0, 1], dtype=np.uint16)
    # add-one smoothing over a vocab of 2: p(0) = 4/6, so held-out all zeros gives perplexity 1.5
    assert unigram_perplexity(train, np.zeros(5, dtype=np.uint16), 2) == pytest.approx(1.5)


@pytest.mark.parametrize("name", ["tiny", "tiny-draft"])
def test_model_cards_carry_measured_numbers(name):
    stats = json.loads((BUNDLED_DIR / name / "training.json").read_text())
    card = (BUNDLED_DIR / name / "README.md").read_text()
    assert stats["held_out_perplexity"] < stats["unigram_perplexity"] / 4, "the model must beat unigram clearly"
    for key in ("parameters", "tokens_seen", "train_seconds", "held_out_perplexity", "unigram_perplexity"):
        assert key in stats
    assert f"{stats['held_out_perplexity']:.2f}" in card and f"{stats['tokens_seen']:,}" in card
    if name == "tiny":
        assert 3e6 <= stats["parameters"] <= 8e6
    else:
        assert stats["flops_ratio"] <= 0.2, "the draft must cost at most a fifth of the target per token"
        assert f"{stats['greedy_agreement']:.3f}" in card
