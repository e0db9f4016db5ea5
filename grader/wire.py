"""grader.wire: the plain data that crosses between the checker and a learner's process.

One message is one line of JSON. Tensors travel in a single safetensors blob per message
(base64 in the field `__st__`), and the JSON holds `{"__tensor__": "t0"}` where each one
was. Nothing else is accepted: no pickle, no classes, no callables. What a learner's
process sends is decoded into dicts, lists, str, int, float, bool, None and CPU tensors,
so the checker never runs code that came from the learner's side.
"""

from __future__ import annotations

import base64
import json
from typing import Any

MAX_MESSAGE_BYTES = 64 << 20  # one prefill's logits of the bundled model are about 8 MB once encoded


class WireError(ValueError):
    """A message that is not plain data of the expected shape."""


def encode(message: dict[str, Any]) -> bytes:
    """One line: the message as JSON, its tensors in one safetensors blob."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().to("cpu").contiguous().clone()  # clone: views of one storage
            return {"__tensor__": name}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return int.__index__(value)  # an int subclass travels as a plain int
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str.__str__(value)
        raise WireError(f"cannot send a {type(value).__name__}: only numbers, strings, lists, dicts and tensors")

    body = plain(message)
    if tensors:
        body["__st__"] = base64.b64encode(save(tensors)).decode("ascii")
    return json.dumps(body, allow_nan=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """The message a line holds, with tensors restored; raises WireError for anything else."""
    from safetensors.torch import load

    if len(line) > MAX_MESSAGE_BYTES:
        raise WireError(f"a message of {len(line)} bytes is larger than the {MAX_MESSAGE_BYTES} allowed")
    try:
        body = json.loads(line)
    except ValueError as err:
        raise WireError(f"not JSON: {err}") from None
    if not isinstance(body, dict):
        raise WireError("a message must be a JSON object")
    blob = body.pop("__st__", None)
    try:
        tensors = load(base64.b64decode(blob, validate=True)) if blob is not None else {}
    except Exception as err:  # noqa: BLE001 (a malformed blob is the sender's fault, whatever safetensors raises)
        raise WireError(f"tensors could not be read: {err}") from None

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                if value["__tensor__"] not in tensors:
                    raise WireError(f"unknown tensor {value['__tensor__']!r}")
                return tensors[value["__tensor__"]]
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(body)
