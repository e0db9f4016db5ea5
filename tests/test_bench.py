"""The measurement tools: interleaved comparison and the bandwidth probe."""

from __future__ import annotations

import time

import numpy as np
import pytest

from inferlab.bench import bootstrap_ci, compare, memory_bandwidth


def test_bootstrap_interval_contains_the_median():
    values = np.random.default_rng(0).normal(10, 1, 200)
    lo, hi = bootstrap_ci(values)
    assert lo < np.median(values) < hi and hi - lo < 1


def test_compare_recovers_a_known_ratio_and_interleaves():
    order = []

    def work(name, seconds):
        def run():
            order.append(name)
            time.sleep(seconds)
        return run

    result = compare({"slow": work("slow", 0.006), "fast": work("fast", 0.002)}, baseline="slow",
                     warmup=1, min_rounds=5, max_rounds=15, rel_ci=0.2)
    assert result.speedup("fast") == pytest.approx(3.0, rel=0.35)
    timed = order[2:]  # after one warm-up round of each
    assert len(timed) == 2 * result.rounds
    # each round runs both, and the order is not always the same
    rounds = [tuple(timed[i:i + 2]) for i in range(0, len(timed), 2)]
    assert all(set(r) == {"slow", "fast"} for r in rounds)
    assert len(set(rounds)) == 2 or result.rounds < 4
    d = result.to_dict()
    assert d["baseline"] == "slow" and "fast" in d["speedup_vs_baseline"]


def test_compare_rejects_unknown_baseline():
    with pytest.raises(ValueError, match="baseline 'x'"):
        compare({"a": lambda: None}, baseline="x")


def test_bandwidth_probe_is_plausible():
    bw = memory_bandwidth(array_mb=32, repeats=3)
    # Any machine that runs this course moves between 0.5 GB/s and 10 TB/s.
    assert 0.5 < bw.copy_gb_s < 1e4 and 0.5 < bw.triad_gb_s < 1e4


def test_foundation_benchmark_runs_and_agrees_with_transformers():
    """A short run of `make bench`'s foundation section: all three decoders emit the same greedy tokens."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    section = bench_run.foundation(prompt_tokens=8, new_tokens=8)
    section.update(machine=bench_run.machine(), date="today")
    assert section["decode"]["greedy_tokens_identical"]
    assert set(section["decode"]["contenders"]) == {"naive_generate", "hf_generate_no_cache", "hf_generate_cache"}
    table = bench_run.markdown({"foundation": section})
    assert "| hf_generate_cache |" in table and "GB/s" in table


def load_bench_run():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    return bench_run


def test_kv_cache_reference_vs_hf_benchmark_runs_on_identical_tokens():
    """A short run of `make bench`'s kv_cache_vs_hf section: the lab's reference and Hugging Face agree."""
    pytest.importorskip("transformers")
    bench_run = load_bench_run()
    section = bench_run.kv_cache_vs_hf(prompt_tokens=16, new_tokens=8, rounds=(3, 3))
    section.update(machine=bench_run.machine(), date="today")
    assert section["greedy_tokens_identical"]
    assert section["reference_over_hf"] > 0 and section["ci95"][0] <= section["reference_over_hf"] <= section["ci95"][1]
    table = bench_run.markdown({"kv_cache_vs_hf": section})
    assert "kv_cache lab reference" in table and "Hugging Face's speed" in table


def test_continuous_batching_reference_vs_hf_benchmark_runs():
    """A short run of `make bench`'s continuous_batching_vs_hf section on one trace."""
    pytest.importorskip("transformers")
    bench_run = load_bench_run()
    section = bench_run.continuous_batching_vs_hf(rounds=(1, 1))
    section.update(machine=bench_run.machine(), date="today")
    # Left padding changes float sums a little, so a rare argmax tie may differ; most requests must agree.
    assert section["identical_requests"] >= 0.8 * section["requests"], section
    assert section["reference_over_hf"] > 0
    table = bench_run.markdown({"continuous_batching_vs_hf": section})
    assert "continuous_batching lab reference" in table
