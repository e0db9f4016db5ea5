"""bench/run.py: the course's benchmarks (`make bench`); writes results.json and results.md to --out.

Sections (each replaces its own entry in results.json, the others are kept):
  foundation: the machine's memory bandwidth, and batch-1 decode of the bundled `tiny`
              model with `naive_generate` against Hugging Face `generate` with and
              without its KV cache, on the same weights, timed interleaved.

    python bench/run.py --out bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import torch


def machine() -> dict:
    from grader.doctor import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def foundation(prompt_tokens: int = 32, new_tokens: int = 128) -> dict:
    import transformers

    from inferlab import load_model, load_tokenizer, naive_generate
    from inferlab.bench import compare, memory_bandwidth
    from inferlab.loading import resolve_model_dir
    from inferlab.workloads import prompts

    bw = memory_bandwidth(array_mb=256, repeats=10)
    model, tok = load_model("tiny"), load_tokenizer("tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny"), dtype=torch.float32).eval()
    prompt = prompts(tok, 1, seed=0, min_tokens=prompt_tokens, max_tokens=prompt_tokens)[0]
    ids = torch.tensor([prompt])
    outputs: dict[str, list[int]] = {}

    def hf_generate(use_cache: bool):
        def run():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=use_cache,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.eos_id)
            outputs[f"hf_generate_cache={use_cache}"] = out[0, len(prompt):].tolist()
        return run

    def naive():
        outputs["naive_generate"] = naive_generate(model, prompt, new_tokens)

    result = compare({"naive_generate": naive, "hf_generate_no_cache": hf_generate(False),
                      "hf_generate_cache": hf_generate(True)},
                     baseline="naive_generate", warmup=1, min_rounds=5, max_rounds=15, rel_ci=0.05)
    rows = {}
    for name in result.times:
        seconds = result.median_s(name)
        rows[name] = {"median_s": seconds, "tokens_per_s": new_tokens / seconds,
                      "speedup_vs_naive": 1.0 if name == "naive_generate" else result.speedup(name),
                      "ci95": None if name == "naive_generate" else
                      [result.ratios[name]["ci_low"], result.ratios[name]["ci_high"]]}
    same = len({tuple(v) for v in outputs.values()}) == 1
    return {"bandwidth": bw.to_dict(), "decode": {"model": "tiny", "batch": 1, "prompt_tokens": len(prompt),
                                                    "new_tokens": new_tokens, "greedy_tokens_identical": same,
                                                    "rounds": result.rounds, "stable": result.stable,
                                                    "contenders": rows},
            "transformers": transformers.__version__}


def kv_cache_vs_hf(prompt_tokens: int = 128, new_tokens: int = 128, rounds: tuple[int, int] = (8, 25)) -> dict:
    """The kv_cache lab's reference (`cached_generate` from the solution notebook) against Hugging Face
    `generate` with its KV cache, batch 1, greedy, the same weights and prompt, interleaved."""
    import transformers

    from grader.labs import load
    from inferlab import load_model, load_tokenizer
    from inferlab.bench import compare
    from inferlab.loading import resolve_model_dir
    from inferlab.workloads import prompts

    cached_generate = load("kv_cache").reference_namespace()["cached_generate"]
    model, tok = load_model("tiny"), load_tokenizer("tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny"), dtype=torch.float32).eval()
    prompt = prompts(tok, 1, seed=1, min_tokens=prompt_tokens, max_tokens=prompt_tokens)[0]
    ids = torch.tensor([prompt])
    outputs: dict[str, list[int]] = {}

    def hf_generate():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.eos_id)
        outputs["hf"] = out[0, len(prompt):].tolist()

    def reference():
        outputs["reference"] = cached_generate(model, list(prompt), new_tokens)

    result = compare({"hf_generate_cache": hf_generate, "kv_cache_reference": reference},
                     baseline="hf_generate_cache", warmup=2, min_rounds=rounds[0], max_rounds=rounds[1], rel_ci=0.05)
    return {"model": "tiny", "batch": 1, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "rounds": result.rounds, "stable": result.stable,
            "greedy_tokens_identical": outputs["hf"] == outputs["reference"],
            "tokens_per_s": {name: new_tokens / result.median_s(name) for name in result.times},
            "reference_over_hf": result.speedup("kv_cache_reference"),
            "ci95": [result.ratios["kv_cache_reference"]["ci_low"], result.ratios["kv_cache_reference"]["ci_high"]],
            "transformers": transformers.__version__}


def continuous_batching_vs_hf(seed: int = 1, rounds: tuple[int, int] = (5, 15)) -> dict:
    """The continuous_batching lab's reference scheduler (`ContinuousBatcher` from the solution notebook) against
    Hugging Face batched `generate` (static batching: batches of the same size, each run to its longest request,
    left-padded), on the same mixed-length trace and weights, greedy, interleaved. Throughput counts the tokens the
    requests asked for."""
    import transformers

    from grader.labs import load
    from grader.labs.continuous_batching import public as lab
    from inferlab import load_model, load_tokenizer
    from inferlab.bench import compare
    from inferlab.loading import resolve_model_dir

    batcher_cls = load("continuous_batching").reference_namespace()["ContinuousBatcher"]
    model, tok = load_model("tiny"), load_tokenizer("tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny"), dtype=torch.float32).eval()
    requests = lab.perf_trace(seed)  # [max_new_tokens, *prompt] each
    batch = lab.PERF_MAX_BATCH
    outputs: dict[str, list[list[int]]] = {}

    def hf_static():
        out = []
        for i in range(0, len(requests), batch):
            chunk = requests[i:i + batch]
            width, longest = max(len(r) - 1 for r in chunk), max(r[0] for r in chunk)
            ids = torch.tensor([[tok.eos_id] * (width - len(r) + 1) + r[1:] for r in chunk])  # left padding
            mask = torch.tensor([[0] * (width - len(r) + 1) + [1] * (len(r) - 1) for r in chunk])
            with torch.inference_mode():
                gen = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=longest,
                                  min_new_tokens=longest, pad_token_id=tok.eos_id)
            out += [gen[j, width:width + r[0]].tolist() for j, r in enumerate(chunk)]
        outputs["hf"] = out

    def reference():
        outputs["reference"] = lab.run_batcher(batcher_cls, model, requests)

    result = compare({"hf_generate_static_batches": hf_static, "continuous_batching_reference": reference},
                     baseline="hf_generate_static_batches", warmup=1, min_rounds=rounds[0], max_rounds=rounds[1],
                     rel_ci=0.05)
    useful = sum(r[0] for r in requests)
    same = sum(a == b for a, b in zip(outputs["hf"], outputs["reference"]))
    return {"model": "tiny", "requests": len(requests), "max_batch_size": batch, "token_budget": lab.PERF_TOKEN_BUDGET,
            "new_tokens_requested": useful, "prompt_tokens": sum(len(r) - 1 for r in requests),
            "rounds": result.rounds, "stable": result.stable, "identical_requests": same,
            "tokens_per_s": {name: useful / result.median_s(name) for name in result.times},
            "reference_over_hf": result.speedup("continuous_batching_reference"),
            "ci95": [result.ratios["continuous_batching_reference"]["ci_low"],
                     result.ratios["continuous_batching_reference"]["ci_high"]],
            "transformers": transformers.__version__}


SECTIONS = {"foundation": foundation, "kv_cache_vs_hf": kv_cache_vs_hf,
            "continuous_batching_vs_hf": continuous_batching_vs_hf}


def markdown(results: dict) -> str:
    lines = ["# inferlab benchmark results", "",
             "Written by `make bench` (`bench/run.py`). Ratios are medians of per-round ratios from",
             "interleaved runs in one process; 95% bootstrap intervals in brackets.", ""]
    for name, section in results.items():
        if name == "foundation":
            m, bw, dec = section["machine"], section["bandwidth"], section["decode"]
            lines += [f"## foundation ({section['date']})", "",
                      f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
                      f"transformers {section['transformers']}.", "",
                      f"Memory bandwidth (STREAM-style, {bw['array_mb']:.0f} MB arrays, best of 10): "
                      f"copy **{bw['copy_gb_s']:.1f} GB/s**, triad **{bw['triad_gb_s']:.1f} GB/s**.", "",
                      f"Batch-1 greedy decode of `tiny`: {dec['prompt_tokens']}-token prompt, "
                      f"{dec['new_tokens']} new tokens, {dec['rounds']} interleaved rounds"
                      f"{'' if dec['stable'] else ' (interval target not reached)'}; "
                      f"identical tokens from all three: {'yes' if dec['greedy_tokens_identical'] else 'NO'}.", "",
                      "| implementation | median s | tokens/s | speedup vs naive [95% CI] |",
                      "| --- | ---: | ---: | --- |"]
            for impl, row in dec["contenders"].items():
                ci = f" [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]" if row["ci95"] else ""
                lines.append(f"| {impl} | {row['median_s']:.3f} | {row['tokens_per_s']:.1f} | "
                             f"{row['speedup_vs_naive']:.2f}x{ci} |")
            lines.append("")
        if name == "grading_throughput":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from grading_throughput import markdown as throughput_markdown

            lines += throughput_markdown(section)
        if name == "kv_cache_vs_hf":
            s = section
            tps = s["tokens_per_s"]
            lines += [f"## kv_cache reference vs Hugging Face ({s['date']})", "",
                      f"Batch-1 greedy decode of `{s['model']}`, {s['prompt_tokens']}-token prompt, {s['new_tokens']} "
                      f"new tokens, {s['rounds']} interleaved rounds{'' if s['stable'] else ' (interval target not reached)'}; "
                      f"identical tokens: {'yes' if s['greedy_tokens_identical'] else 'NO'}; transformers {s['transformers']}.", "",
                      "| implementation | tokens/s |", "| --- | ---: |",
                      f"| Hugging Face `generate`, KV cache on | {tps['hf_generate_cache']:.1f} |",
                      f"| kv_cache lab reference (`cached_generate`) | {tps['kv_cache_reference']:.1f} |", "",
                      f"The reference is **{s['reference_over_hf']:.2f}x** Hugging Face's speed "
                      f"[95% CI {s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}].", ""]
        if name == "continuous_batching_vs_hf":
            s = section
            tps = s["tokens_per_s"]
            lines += [f"## continuous_batching reference vs Hugging Face ({s['date']})", "",
                      f"`{s['model']}`, one mixed-length trace of {s['requests']} requests ({s['prompt_tokens']} prompt "
                      f"tokens, {s['new_tokens_requested']} new tokens asked for), all waiting at once, batches of "
                      f"{s['max_batch_size']}, greedy, {s['rounds']} interleaved rounds"
                      f"{'' if s['stable'] else ' (interval target not reached)'}; requests with identical tokens: "
                      f"{s['identical_requests']} of {s['requests']}; transformers {s['transformers']}.", "",
                      "| implementation | useful tokens/s |", "| --- | ---: |",
                      f"| Hugging Face batched `generate` (static batches, left-padded) | {tps['hf_generate_static_batches']:.1f} |",
                      f"| continuous_batching lab reference (`ContinuousBatcher`) | {tps['continuous_batching_reference']:.1f} |", "",
                      f"The reference is **{s['reference_over_hf']:.2f}x** Hugging Face's throughput "
                      f"[95% CI {s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}].", ""]
        if name == "perf_robustness":
            s = section
            lines += [f"## perf_robustness ({s['date']})", "",
                      "The kv_cache KV4 graded measure (`bench/perf_robustness.py`), run as the autograder runs it "
                      "(two sandboxed processes: the submission's code interleaved with the baseline and the "
                      "reference), on the reference sample and on the 'slow' sample, alternating, "
                      f"{'with' if s['cpu_bound_neighbour'] else 'without'} a CPU-bound process alongside, "
                      f"{s.get('torch_threads', 1)} torch thread(s) per process:", "",
                      f"* reference passed **{s['reference_passed']} / {s['runs']}** (failed "
                      f"{s.get('reference_failed', '?')}, inconclusive {s.get('reference_inconclusive', '?')}); slow "
                      f"failed **{s['slow_failed']} / {s['runs']}** (passed {s.get('slow_passed', '?')}, inconclusive "
                      f"{s.get('slow_inconclusive', '?')}); {s['seconds']:.0f} s in all; the bar: "
                      f"{s.get('min_fraction_of_reference', '?')} of the reference's speedup"]
            for who in ("reference", "slow"):
                rows = [o for o in s["outcomes"][who] if o.get("speedup") is not None]
                if not rows:
                    continue
                speeds = sorted(o["speedup"] for o in rows)
                line = f"* {who}: speedup over naive {speeds[0]}x to {speeds[-1]}x"
                fractions = sorted(o["fraction_of_reference"] for o in rows if o.get("fraction_of_reference"))
                if fractions:
                    refs = sorted(o["reference_speedup"] for o in rows)
                    line += (f"; {fractions[0]} to {fractions[-1]} of the reference's speedup in the same run "
                             f"({refs[0]}x to {refs[-1]}x)")
                lines.append(line + f"; per run {min(o['seconds'] for o in rows):.0f} to "
                                    f"{max(o['seconds'] for o in rows):.0f} s")
            for who in ("reference", "slow"):  # each inconclusive run, with the reason it gave
                for i, o in enumerate(s["outcomes"][who], 1):
                    if o["status"] == "inconclusive":
                        lines.append(f"* {who}, run {i}, inconclusive: {o.get('message', '')}")
            lines.append("")
    return "\n".join(lines)


# What other benches write on their own (they need extra installs or minutes of their own), included in
# results.md as they last wrote it: `make bench-quantization` (torchao) and `make bench-vllm` (vLLM's venv).
INCLUDED = (("results-quantization.md", "make bench-quantization"), ("results-vllm.md", "make bench-vllm"))


def included(folder: Path) -> str:
    parts = []
    for name, command in INCLUDED:
        path = folder / name
        if path.is_file():
            text = path.read_text().strip()
            # One level down: each file's own title becomes a section of this page.
            text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
            parts.append(f"{text}\n\n(from [{name}]({name}), written by `{command}`)\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json and results.md")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    opts = parser.parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in opts.only or SECTIONS:
        print(f"running {name} ...", flush=True)
        section = SECTIONS[name]()
        section["machine"] = machine()
        section["date"] = dt.date.today().isoformat()
        results[name] = section
    path.write_text(json.dumps(results, indent=2) + "\n")
    page = markdown(results) + "\n" + included(opts.out)  # every section, including ones other scripts wrote
    (opts.out / "results.md").write_text(page)
    print(f"wrote {path} and {opts.out / 'results.md'}")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
