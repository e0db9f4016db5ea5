"""grader.labs.quantization.probes: what the checker may ask of a learner's quantization answers, in their sandbox.

Each probe calls the learner's code on inputs the checker sent and returns plain data (tensors, numbers,
the bytes the learner's objects hold). None of them holds an expected value or decides anything:
`grading.py`, in the checker, does that. The same functions answer a notebook's self-checks in its
own process (`public.local_ask`), where `get` looks up the learner's objects directly.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from inferlab import ModelArgs, Transformer

from .public import (decode_steps, int8_speed_model, module_bytes_held, plain, speed_model, tensor_bytes_held,
                     triton_launches)

Get = Callable[[str], Any]  # a name the answer cells define -> the learner's object


def _raised(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    try:
        fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 (the point: which error the learner's code raises for a bad input)
        return {"raised": type(err).__name__, "message": str(err)[:300]}
    return {"raised": None}


def _int(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return plain(value)


# QZ1
def int8_quantize(get: Get, weight: torch.Tensor) -> Any:
    return plain(get("quantize_int8")(weight.clone()))


def int8_quantize_bad(get: Get, weight: torch.Tensor) -> dict[str, Any]:
    return _raised(get("quantize_int8"), weight)


def int8_dequantize(get: Get, q: torch.Tensor, scale: torch.Tensor) -> Any:
    return plain(get("dequantize_int8")(q.clone(), scale.clone()))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def int8_linear(get: Get, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> dict[str, Any]:
    module = get("QuantLinear")(_linear(weight, bias))
    # The Linear it was built from is gone: only what the module keeps counts.
    return {"out": plain(module(x)), "held": module_bytes_held(module), "claimed": _int(module.nbytes)}


@torch.no_grad()
def int8_model(get: Get, args: dict[str, Any], seed: int, tokens: torch.Tensor) -> dict[str, Any]:
    from inferlab import replace_linears
    from ..common import random_model

    model = random_model(ModelArgs(**args), seed)
    cls = get("QuantLinear")
    replaced = replace_linears(model, lambda name, linear: cls(linear))
    return {"logits": plain(model(tokens)), "replaced": replaced, "held": module_bytes_held(model)}


# QZ2
def int4_quantize(get: Get, weight: torch.Tensor, group_size: int) -> Any:
    return plain(get("quantize_int4")(weight.clone(), group_size))


def int4_quantize_bad(get: Get, weight: torch.Tensor, group_size: int) -> dict[str, Any]:
    return _raised(get("quantize_int4"), weight, group_size)


def int4_dequantize(get: Get, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                    group_size: int) -> Any:
    return plain(get("dequantize_int4")(packed.clone(), scales.clone(), offsets.clone(), group_size))


# QZ3
def int4_matmul(get: Get, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> dict[str, Any]:
    fn = get("int4_matmul")
    with triton_launches() as counted:
        out = fn(x.clone(), packed.clone(), scales.clone(), offsets.clone(), group_size)
    return {"out": plain(out), "launches": counted["launches"]}


# QZ5
def _quantized_tiny_weights(get: Get, scheme: str, group_size: int | None) -> dict[str, list[torch.Tensor]]:
    from inferlab import load_model

    model = load_model("tiny")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if scheme == "int8":
                out[name] = list(get("quantize_int8")(module.weight.detach().clone()))
            else:
                out[name] = list(get("quantize_int4")(module.weight.detach().clone(), group_size))
    return out


def quantized_weights(get: Get, scheme: str, group_size: int | None) -> Any:
    """QZ5: the learner's codes and scales for every Linear of tiny; the checker dequantizes them itself."""
    return plain(_quantized_tiny_weights(get, scheme, group_size))


@torch.no_grad()
def perplexity(get: Get, scheme: str, group_size: int | None, texts: list[list[int]]) -> Any:
    """QZ5: the learner's perplexity of tiny on the checker's texts: fp32; INT8 through QuantLinear; INT4 with the
    learner's own dequantized weights."""
    from inferlab import load_model, replace_linears

    model: Transformer = load_model("tiny")
    if scheme == "int8":
        cls = get("QuantLinear")
        replace_linears(model, lambda name, linear: cls(linear))
    elif scheme == "int4":
        weights = _quantized_tiny_weights(get, scheme, group_size)
        deq = get("dequantize_int4")
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(deq(*weights[name], group_size).float().reshape(module.weight.shape))
    got = get("perplexity")(model, [list(t) for t in texts])
    return float(got) if isinstance(got, (int, float, torch.Tensor)) and not isinstance(got, bool) else plain(got)


# QZ6
_SPEED: dict[str, Any] = {}  # the one INT8 random Llama this process holds, and the class it was built with


def speed_decode(get: Get, prompt: list[int]) -> Any:
    """QZ6's gate: the random Llama with the learner's QuantLinear (built once), decode steps on the checker's prompt."""
    cls = get("QuantLinear")
    if _SPEED.get("cls") is not cls:
        _SPEED.clear()
        _SPEED.update(cls=cls, model=int8_speed_model(cls))
    return decode_steps(_SPEED["model"], list(prompt))


LOCAL: dict[str, Callable[..., Any]] = {
    "int8_quantize": int8_quantize, "int8_quantize_bad": int8_quantize_bad, "int8_dequantize": int8_dequantize,
    "int8_linear": int8_linear, "int8_model": int8_model, "int4_quantize": int4_quantize,
    "int4_quantize_bad": int4_quantize_bad, "int4_dequantize": int4_dequantize, "int4_matmul": int4_matmul,
    "quantized_weights": quantized_weights, "perplexity": perplexity, "speed_decode": speed_decode,
}


# QZ4: the checker drives the learner's cache through `update` (grader.check_stage.RemoteCache)
def new_kv_cache(session, args: dict, batch_size: int, max_seq_len: int) -> int:
    return session.handle(session.answer("Int8KVCache")(ModelArgs(**args), batch_size, max_seq_len))


def kv_cache_bytes(session, args: dict, batch_size: int, max_seq_len: int) -> list[Any]:
    cache = session.answer("Int8KVCache")(ModelArgs(**args), batch_size, max_seq_len)
    return [_int(cache.nbytes), tensor_bytes_held(cache)]


def _remote(fn: Callable[..., Any]) -> Callable[..., Any]:
    def probe(session, **inputs: Any) -> Any:
        return fn(session.answer, **inputs)
    probe.__doc__ = fn.__doc__
    return probe


PROBES = {**{name: _remote(fn) for name, fn in LOCAL.items()}, "new_kv_cache": new_kv_cache,
          "kv_cache_bytes": kv_cache_bytes}


def perf_contenders(role: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """What a timing worker (`grader.perf_worker`) runs for QZ6: decode steps of the random Llama, fp32 (the
    baseline) and with every Linear swapped for QuantLinear (the learner's, or the reference's)."""
    cls = namespace.get("QuantLinear")
    if not isinstance(cls, type):
        raise NameError("QuantLinear is not defined by the QZ1 answer cell")
    torch.set_grad_enabled(False)
    int8 = int8_speed_model(cls)
    if role == "submission":
        return {"candidate": lambda prompt: decode_steps(int8, prompt)}
    fp32 = speed_model()
    return {"baseline": lambda prompt: decode_steps(fp32, prompt),
            "reference": lambda prompt: decode_steps(int8, prompt)}
