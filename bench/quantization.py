"""bench/quantization.py: the quantization lab's reference next to torchao, on the same models (`make bench-quantization`).

Rows: bytes of the Linear weights, perplexity of `tiny` on held-out text (fp32, INT8, INT4 at group sizes 32 and
64), and decode tokens/s of the lab's memory-bound random Llama (`checks.SPEED_ARGS`, 152M parameters), fp32 against
INT8 weight-only (the lab's reference) and the lab's INT4 codes through PyTorch's CPU int4 kernel, timed interleaved
on one torch thread. torchao's Int8WeightOnlyConfig / Int4WeightOnlyConfig are measured on the
same models where they run on this machine; a config that does not run says why in its row. gpt-fast's published
A100 numbers are quoted for context (not measured here).

    python bench/quantization.py --out bench    # writes bench/results-quantization.json and .md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

INT4_SPEED_GROUP = 32  # as gpt-fast's INT4 row; the random Llama's widths (1024, 2816) are multiples of it
GPT_FAST_A100 = {  # github.com/pytorch-labs/gpt-fast README, Llama-2-7B, tokens/s, batch 1, A100 80GB
    "fp16/bf16": 104.9, "int8 weight-only": 155.6, "int4 weight-only (g32)": 196.8}


def linear_bytes(model: nn.Module) -> int:
    """Bytes held by every Linear-like leaf that replaced or is an nn.Linear (weights, scales, biases), counted on
    the tensors themselves, tensor subclasses unpacked (torchao keeps its codes inside its weight tensors)."""
    total, seen = 0, set()
    for name, module in model.named_modules():
        if name == "" or "embed_tokens" in name or list(module.children()):
            continue
        if not (isinstance(module, nn.Linear) or "Linear" in type(module).__name__):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            for inner in _storages(t):
                if inner.data_ptr() not in seen:
                    seen.add(inner.data_ptr())
                    total += inner.nbytes()
    return total


def _storages(t: torch.Tensor) -> list[Any]:
    attrs = getattr(t, "__tensor_flatten__", None)
    if attrs is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _storages(getattr(t, n))]
    return [t.untyped_storage()]


def reference_parts() -> dict[str, Any]:
    from grader import labs

    return labs.load("quantization").reference_namespace()


def gpu_check_path(device: str, quick: bool) -> dict[str, Any]:
    """A `TRITON_PATHS` entry for bench/gpu_check.py: the lab's reference INT4 kernel (`int4_matmul`, group 64)
    against dequantize-then-matmul in torch; on the GPU also both times (`triton.testing.do_bench`, which warms
    up and synchronises). Quick: x [5, 128] by a [72, 128] weight (the interpreter is slow; neither a multiple of
    the kernel's blocks), else a decode-sized x [1, 4096] by a [4096, 4096] weight."""
    ns = reference_parts()
    m, n, k, group = (5, 72, 128, 64) if quick else (1, 4096, 4096, 64)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen)  # [N, K]
    x = torch.randn(m, k, generator=gen).to(device)  # [M, K]
    packed, scales, offsets = (t.to(device) for t in ns["quantize_int4"](weight, group))

    def fused():
        return ns["int4_matmul"](x, packed, scales, offsets, group)

    def dequantize_then_matmul():
        return x @ ns["dequantize_int4"](packed, scales, offsets, group).T

    got, want = fused(), dequantize_then_matmul()
    result = {"shape": [m, n, k], "group_size": group, "max_abs_error": float((got - want).abs().max()),
              "tolerance": 1e-3 * float(want.abs().max()) + 1e-4}
    if device == "cuda":
        from triton.testing import do_bench

        result["triton_ms"] = round(do_bench(fused), 4)
        result["torch_ms"] = round(do_bench(dequantize_then_matmul), 4)
    return result


class Int4PackLinear(nn.Module):
    """The lab reference's INT4 codes (asymmetric, group-wise: w = q * scale + offset, q in 0..15) multiplied by
    PyTorch's CPU int4 kernel. That kernel takes its own packed layout (`_convert_weight_to_int4pack_for_cpu`, from
    the codes as int32 [N, K]) and w = (q - 8) * scale + zero, so zero = offset + 8 * scale: the same codes, the same
    bytes (half a byte per weight, a scale and zero per group, here in bf16). The kernel is fast only with bf16
    activations (measured on this CPU, [1, 1024] by [2816, 1024]: 0.2 ms in bf16, 5.8 ms in fp32, fp32 matmul 0.6
    ms), so it is fed bf16, as PyTorch's int8 kernel is in the lab's reference."""

    def __init__(self, linear: nn.Linear, group: int, quantize_int4):
        super().__init__()
        packed, scales, offsets = quantize_int4(linear.weight.detach(), group)  # [N, K/2] uint8, [N, K/g] twice
        codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int32)  # [N, K]
        codes[:, 0::2], codes[:, 1::2] = packed & 0x0F, packed >> 4
        inner_k_tiles = 8 if codes.shape[1] % 128 == 0 else 2  # the kernel's tiling of K; 8 was faster here
        packed_for_cpu = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)
        self.register_buffer("weight_int4pack", packed_for_cpu)
        self.register_buffer("scales_and_zeros",  # [K/g, N, 2]
                             torch.stack([scales.T, (offsets + 8 * scales).T], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.group, self.out_features = group, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [M, K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4pack, self.group,
                                                       self.scales_and_zeros)  # [M, N]
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def fake_quantized(model: nn.Module, dequantize) -> nn.Module:
    q = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in q.named_modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(dequantize(module.weight.detach()))
    return q


def quality_rows(ref: dict[str, Any]) -> list[dict[str, Any]]:
    """tiny: bytes of the Linears and perplexity on held-out text, per scheme, ours and torchao's."""
    from inferlab import load_model, replace_linears

    from grader.labs.quantization.grading import int4_bytes, perplexity_of
    from grader.labs.quantization.public import held_out_texts

    texts = held_out_texts(seed=0, n=8, length=256)
    tiny = load_model("tiny")
    fp32 = perplexity_of(tiny, texts)
    rows = [{"model": "tiny", "scheme": "fp32", "by": "-", "bytes": linear_bytes(tiny), "perplexity": fp32}]
    int8 = copy.deepcopy(tiny)
    replace_linears(int8, lambda n, lin: ref["QuantLinear"](lin))
    rows.append({"model": "tiny", "scheme": "int8 weight-only", "by": "lab reference", "bytes": linear_bytes(int8),
                 "perplexity": perplexity_of(int8, texts)})
    linears = [m for m in tiny.modules() if isinstance(m, nn.Linear)]
    for g in (32, 64):
        q = fake_quantized(tiny, lambda w: ref["dequantize_int4"](*ref["quantize_int4"](w, g), g))
        rows.append({"model": "tiny", "scheme": f"int4 weight-only g{g}", "by": "lab reference",
                     "bytes": sum(int4_bytes(*m.weight.shape, g) for m in linears), "perplexity": perplexity_of(q, texts),
                     "note": "fp32 scale and offset per group; dequantized to fp32 for the perplexity"})
    rows += torchao_quality(tiny, texts, perplexity_of)
    for row in rows:
        row["perplexity_increase"] = row["perplexity"] / fp32 - 1 if row.get("perplexity") else None
    return rows


def torchao_configs() -> list[tuple[str, Any]]:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    return [("int8 weight-only", lambda: Int8WeightOnlyConfig()),
            ("int4 weight-only g32", lambda: Int4WeightOnlyConfig(group_size=32)),
            ("int4 weight-only g32, tile_packed_to_4d", lambda: Int4WeightOnlyConfig(
                group_size=32, int4_packing_format="tile_packed_to_4d")),
            ("int4 weight-only g32, plain_int32", lambda: Int4WeightOnlyConfig(
                group_size=32, int4_packing_format="plain_int32"))]


def torchao_quality(tiny: nn.Module, texts, perplexity_of) -> list[dict[str, Any]]:
    try:
        from torchao.quantization import quantize_
        configs = torchao_configs()
    except Exception as err:  # noqa: BLE001 (what fails is the row's content)
        return [{"model": "tiny", "scheme": "any", "by": "torchao", "error": f"{type(err).__name__}: {err}"[:300]}]
    rows = []
    for scheme, make in configs:
        row = {"model": "tiny", "scheme": scheme, "by": "torchao"}
        try:
            q = copy.deepcopy(tiny)
            quantize_(q, make())
            row.update(bytes=linear_bytes(q), perplexity=perplexity_of(q, texts))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
    return rows


def speed_rows(ref: dict[str, Any]) -> list[dict[str, Any]]:
    """Decode steps of the random Llama: fp32, the lab's INT8 and torchao's, interleaved on one thread."""
    from inferlab.bench import compare

    from grader.labs.common import one_torch_thread
    from grader.labs.quantization.public import SPEED_ARGS, decode_steps, int8_speed_model, speed_model, speed_prompts

    prompt = speed_prompts(0, 1)[0]
    fp32 = speed_model()
    contenders = {"fp32": fp32, "lab reference int8": int8_speed_model(ref["QuantLinear"])}
    errors = {}
    # INT4 on this CPU: the lab's codes through PyTorch's int4 kernel (torchao's INT4 does not run here, below).
    int4_name = f"lab reference int4 g{INT4_SPEED_GROUP} (PyTorch's CPU int4 kernel)"
    try:
        from inferlab import replace_linears

        q = speed_model()
        replace_linears(q, lambda name, linear: Int4PackLinear(linear, INT4_SPEED_GROUP, ref["quantize_int4"]))
        decode_steps(q, prompt[:2])
        contenders[int4_name] = q
    except Exception as err:  # noqa: BLE001
        errors[int4_name] = f"{type(err).__name__}: {err}"[:300]
    try:
        from torchao.quantization import quantize_
        for scheme, make in torchao_configs():
            try:
                q = speed_model()
                quantize_(q, make())
                decode_steps(q, prompt[:2])
                contenders[f"torchao {scheme}"] = q
            except Exception as err:  # noqa: BLE001
                errors[f"torchao {scheme}"] = f"{type(err).__name__}: {err}"[:300]
        # torchao's INT8 path reaches PyTorch's CPU int8 matmul only with bf16 activations: time it on a bf16 model
        # too, next to that bf16 model unquantized.
        contenders["bf16 (not quantized)"] = speed_model().to(torch.bfloat16)
        q = speed_model().to(torch.bfloat16)
        quantize_(q, torchao_configs()[0][1]())
        contenders["torchao int8 weight-only, bf16 model"] = q
    except Exception as err:  # noqa: BLE001
        errors["torchao"] = f"{type(err).__name__}: {err}"[:300]
    with one_torch_thread(), torch.inference_mode():
        result = compare({name: (lambda m=m: decode_steps(m, prompt)) for name, m in contenders.items()},
                         baseline="fp32", warmup=2, min_rounds=10, max_rounds=30, rel_ci=0.05)
    params = sum(p.numel() for p in fp32.parameters())
    rows = []
    for name, model in contenders.items():
        row = {"model": f"random Llama {params / 1e6:.0f}M (dim {SPEED_ARGS.dim}, {SPEED_ARGS.n_layers} layers)",
               "scheme": name, "bytes": linear_bytes(model),
               "speedup_vs_fp32": None if name == "fp32" else round(result.speedup(name), 3)}
        if name != "fp32":
            row["ci95"] = [round(result.ratios[name]["ci_low"], 3), round(result.ratios[name]["ci_high"], 3)]
        row["tokens_per_s"] = len(prompt) / result.median_s(name)
        # Each one-token step reads every Linear weight once: this rate against the core's memory bandwidth says
        # whether a scheme is bound by reading weights (fp32 here) or by its kernel's arithmetic.
        row["note"] = f"reads {row['bytes'] * row['tokens_per_s'] / 1e9:.1f} GB/s of Linear weights"
        rows.append(row)
    rows += [{"model": "random Llama", "scheme": name, "error": err} for name, err in errors.items()]
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Quantization bench ({result['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"torchao {m.get('torchao')})", "",
             "| model | scheme | by | Linear bytes | perplexity | increase | tokens/s | speedup vs fp32 [95% CI] | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["quality"] + result["speed"]:
        cells = [r["model"], r["scheme"], r.get("by", ""), f"{r['bytes']:,}" if r.get("bytes") else "",
                 f"{r['perplexity']:.3f}" if r.get("perplexity") else "",
                 f"{r['perplexity_increase']:+.2%}" if r.get("perplexity_increase") is not None else "",
                 f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "",
                 f"{r['speedup_vs_fp32']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("ci95") else "",
                 (r.get("error") or r.get("note") or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Decode rows: steps of one token each, as a KV-cached decode feeds them, on one torch thread, the "
              "schemes interleaved round by round; a step reads every Linear weight once.",
              "", "gpt-fast, Llama-2-7B on an A100 (published, for context): "
              + ", ".join(f"{k} {v} tok/s" for k, v in GPT_FAST_A100.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    opts = parser.parse_args()
    warnings.filterwarnings("ignore")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from grader.doctor import cpu_name

    try:
        import torchao
        ao_version = torchao.__version__
    except Exception as err:  # noqa: BLE001
        ao_version = f"not importable: {type(err).__name__}: {err}"[:200]
    ref = reference_parts()
    result = {"date": dt.date.today().isoformat(),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version(), "torchao": ao_version},
              "quality": quality_rows(ref), "speed": speed_rows(ref), "gpt_fast_a100_tokens_per_s": GPT_FAST_A100}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "results-quantization.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (opts.out / "results-quantization.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
