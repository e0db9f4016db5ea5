"""Sampling and the naive baseline."""

from __future__ import annotations

import pytest
import torch

from inferlab import naive_generate, sample
from inferlab.generate import filtered_probs, make_generator

from conftest import random_model


def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.randn(3, 50)
    gen = make_generator(7)
    before = gen.get_state()
    assert torch.equal(sample(logits, 0.0, generator=gen), logits.argmax(-1))
    assert torch.equal(gen.get_state(), before)


def test_top_k_keeps_k_tokens():
    logits = torch.randn(2, 50)
    probs = filtered_probs(logits, top_k=5)
    assert ((probs > 0).sum(-1) == 5).all()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    gen = make_generator(0)
    draws = torch.stack([sample(logits, 1.0, top_k=5, generator=gen) for _ in range(200)])
    top5 = logits.topk(5).indices
    assert all(d in top5[row] for row in range(2) for d in draws[:, row])


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(filtered_probs(logits, top_p=0.5), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(filtered_probs(logits, top_p=0.75), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(filtered_probs(logits, top_p=0.9), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.allclose(filtered_probs(logits, top_p=1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_temperature_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    gen = make_generator(1)
    draws = torch.stack([sample(logits, 1.0, generator=gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_bad_sampling_parameters_are_named():
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.randn(5), -1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(torch.randn(5), 1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.randn(5), 1.0, top_p=1.5)


def test_same_seed_same_tokens_different_seed_differs():
    model = random_model()
    prompt = [1, 2, 3, 4]
    a = naive_generate(model, prompt, 30, temperature=1.0, seed=5)
    b = naive_generate(model, prompt, 30, temperature=1.0, seed=5)
    c = naive_generate(model, prompt, 30, temperature=1.0, seed=6)
    assert a == b and a != c and len(a) == 30


def test_naive_generate_greedy_equals_stepwise_argmax():
    model = random_model()
    prompt = [5, 6, 7]
    out = naive_generate(model, prompt, 10)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_stops_after_eos():
    model = random_model()
    first = naive_generate(model, [1, 2], 1)[0]
    assert naive_generate(model, [1, 2], 20, eos_id=first) == [first]


def test_lengths_are_checked_with_both_numbers():
    model = random_model()  # context 64
    with pytest.raises(ValueError, match="prompt is 70 tokens but the model's context is 64"):
        naive_generate(model, [1] * 70, 5)
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) exceeds .* 64 .* at most 4"):
        naive_generate(model, [1] * 60, 10)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        naive_generate(model, [1], 0)
    with pytest.raises(ValueError, match="prompt is empty"):
        naive_generate(model, [], 3)


def test_bundled_tiny_writes_python(tiny, tiny_tokenizer):
    out = tiny_tokenizer.decode(naive_generate(tiny, tiny_tokenizer.encode("def fib(n):"), 48))
    # A model trained on Python source continues a def with an indented body.
    assert "\n    " in out, out
