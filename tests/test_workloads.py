"""Workloads: seeded, held-out, within bounds, and shaped as documented."""

from __future__ import annotations

import numpy as np
import pytest

from inferlab.workloads import LengthDist, arrival_times, held_out_token_files, prompts, request_trace, trace_summary


def test_prompts_are_seeded_bounded_and_held_out(tiny_tokenizer):
    a = prompts(tiny_tokenizer, 20, seed=3, min_tokens=10, max_tokens=40)
    assert a == prompts(tiny_tokenizer, 20, seed=3, min_tokens=10, max_tokens=40)
    assert a != prompts(tiny_tokenizer, 20, seed=4, min_tokens=10, max_tokens=40)
    assert all(10 <= len(p) <= 40 and p[0] == tiny_tokenizer.bos_id for p in a)
    files = held_out_token_files(tiny_tokenizer)
    for p in a[:5]:  # every prompt body is a contiguous slice of some held-out file
        body = p[1:]
        assert any(_contains(f, body) for f in files)


def _contains(haystack, needle) -> bool:
    n = len(needle)
    return any(tuple(haystack[i:i + n]) == tuple(needle) for i in range(len(haystack) - n + 1))


def test_held_out_files_are_not_training_files():
    from inferlab.train import held_out_files, is_held_out

    files = held_out_files()
    assert files and all(is_held_out(path) for path, _ in files)


def test_poisson_and_bursty_arrivals():
    rng = np.random.default_rng(0)
    poisson = np.diff(arrival_times(20001, rate_per_s=5.0, cv=1.0, rng=rng))
    bursty = np.diff(arrival_times(20001, rate_per_s=5.0, cv=3.0, rng=rng))
    for gaps, cv in ((poisson, 1.0), (bursty, 3.0)):
        assert gaps.mean() == pytest.approx(0.2, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_length_distribution_is_heavy_tailed_and_clipped():
    lengths = LengthDist(median=32, sigma=1.0, min=4, max=400).draw(np.random.default_rng(0), 20000)
    assert lengths.min() >= 4 and lengths.max() <= 400
    assert np.median(lengths) == pytest.approx(32, rel=0.1)
    assert np.percentile(lengths, 99) > 6 * np.median(lengths)  # a long right tail
    with pytest.raises(ValueError, match="min <= max"):
        LengthDist(median=10, sigma=1, min=50, max=20)


def test_request_trace(tiny_tokenizer):
    trace = request_trace(tiny_tokenizer, 50, seed=11, rate_per_s=8.0)
    assert trace == request_trace(tiny_tokenizer, 50, seed=11, rate_per_s=8.0)
    assert [r.id for r in trace] == list(range(50))
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(trace, trace[1:]))
    assert all(8 <= r.prompt_len <= 256 and r.prompt_len + r.max_new_tokens <= 512 for r in trace)
    summary = trace_summary(trace)
    assert summary["requests"] == 50 and summary["prompt_len_p99"] >= summary["prompt_len_p50"]
    with pytest.raises(ValueError, match="rate_per_s and cv must be positive"):
        request_trace(tiny_tokenizer, 5, seed=0, rate_per_s=0)
