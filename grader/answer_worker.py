"""grader.answer_worker: a learner's answers, run in a sandbox and called by the checker (`python -m grader.answer_worker`).

The checker (`grader.check_stage`) never runs learner code, and this process never sees an
expected value. The checker sends the answer cells to run, then calls the lab's probes
(`grader/labs/<lab>/probes.py`): small adapters that call the learner's code on inputs the
checker chose and return plain data (`grader.wire`: JSON and safetensors). Where the
learner's code drives a model, it gets a `RemoteModel`: the model itself runs in the
checker, which therefore counts every position it processes, and the checker calls the
learner's cache back layer by layer (`update`), checking each reply.

Protocol (one `grader.wire` message per line; checker -> worker, then worker -> checker):
  {"setup": {"lab", "threads"}}                       -> {"ready": true}
  {"exec": source, "cell": id, "trusted": bool}       -> {"done": true, "raised": "" | "TypeError: ..."}
  {"call": probe, "args": {...}}                      -> {"result": ...} | {"raised": ..., "not_implemented": bool}
  {"update": {"cache", "layer", "input_pos", "k", "v"}} -> {"kv": [k_all, v_all(, key_mask)]} | {"raised": ...}
  while a probe runs, the worker may ask:  {"forward": {"model", "tokens", "input_pos", "cache", "attention_mask"}}
                                      and the checker answers {"logits": tensor} | {"forward_error": message}
Every reply carries "tampered": names of the grader, runtime or library attributes replaced since
the trusted cells ran. That is a flag for the instructor, not a defence: no verdict is computed here.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any


class Session:
    """What the probes may use: the learner's namespace, served models, and handles to the learner's objects."""

    def __init__(self, send, receive, namespace: dict[str, Any]):
        self.send, self.receive, self.ns = send, receive, namespace
        self.objects: dict[int, Any] = {}  # handle -> a learner object the checker refers to (a cache)
        self.handles: dict[int, int] = {}  # id(object) -> handle
        self.models: dict[int, Any] = {}
        self.caller: int | None = None  # the thread answering the checker's current call; None between calls

    def handle(self, obj: Any) -> int:
        """A number the checker can name this object by (kept alive as long as the session)."""
        if id(obj) not in self.handles:
            self.handles[id(obj)] = len(self.objects)
            self.objects[len(self.objects)] = obj
        return self.handles[id(obj)]

    def model(self, spec: dict[str, Any]):
        """The RemoteModel for a model the checker serves: `{"model": id, "args": {...}, "dtype": "float32"}`."""
        if spec["model"] not in self.models:
            self.models[spec["model"]] = remote_model(self, spec)
        return self.models[spec["model"]]

    def answer(self, name: str) -> Any:
        """A name the answer cells must define, with a message that says which when it is missing."""
        if name not in self.ns:
            raise NameError(f"{name} is not defined: run its answer cell (and keep the name the notebook gives)")
        return self.ns[name]


def remote_model(session: Session, spec: dict[str, Any]):
    """A stand-in for `inferlab.Transformer` whose forward pass runs in the checker.

    It has what a generation loop reads (`args`, the device and dtype of its parameters, through
    `embed_tokens.weight` or `parameters()`) and is called like the model. Its weights never come here.
    """
    import torch
    from torch import nn

    from inferlab import ModelArgs

    dtype = getattr(torch, spec.get("dtype", "float32"))

    class Anchor(nn.Module):  # gives `model.embed_tokens.weight.device` / `.dtype` their real values
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

    class RemoteModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.args = ModelArgs(**spec["args"])
            self.embed_tokens = Anchor()

        def forward(self, tokens, input_pos=None, cache=None, attention_mask=None):
            if threading.get_ident() != session.caller:
                # Only the thread running the checker's call may use the pipe: a thread left running after a
                # call returned (a deferred result, say) would interleave its messages with the next call's.
                raise RuntimeError("the model can only be called from the thread that runs the grader's call, "
                                   "while that call runs: return results only once they are computed")
            request = {"model": spec["model"], "tokens": _as_tensor(tokens, "tokens"),
                       "input_pos": None if input_pos is None else _as_tensor(input_pos, "input_pos"),
                       "cache": None if cache is None else session.handle(cache),
                       "attention_mask": None if attention_mask is None else _as_tensor(attention_mask, "attention_mask")}
            session.send({"forward": request})
            reply = serve(session, until=("logits", "forward_error"))
            if "forward_error" in reply:
                raise ValueError(reply["forward_error"])
            return reply["logits"]

    return RemoteModel().eval()


def _as_tensor(value, what: str):
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the model's {what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def learner_error(err: BaseException) -> str:
    """'TypeError: ... (at line 12: code)', naming the innermost line of the learner's own code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f.filename.startswith("<") or "ipython-input" in f.filename]
    where = f" (at line {frames[-1].lineno}: {frames[-1].line.strip()})" if frames and frames[-1].line else ""
    return f"{type(err).__name__}: {err}"[:700] + where


def serve(session: Session, until: tuple[str, ...] = ()) -> dict[str, Any]:
    """Answer the checker's messages; return the first one that has a key in `until` (a nested wait)."""
    while True:
        message = session.receive()
        if message is None:
            raise SystemExit(0)  # the checker closed the pipe: grading is over
        if any(key in message for key in until):
            return message
        answer(session, message)


def answer(session: Session, message: dict[str, Any]) -> None:
    """One request of the checker: a cache update or a probe call, answered with plain data."""
    outer, session.caller = session.caller, threading.get_ident()
    try:
        if "update" in message:
            u = message["update"]
            out = session.objects[u["cache"]].update(u["layer"], u["input_pos"], u["k"], u["v"])
            session.send({"kv": list(out) if isinstance(out, (tuple, list)) else out})
        elif "call" in message:
            probe = PROBES.get(message["call"])
            if probe is None:
                raise KeyError(f"no probe {message['call']!r} in this lab")
            session.send({"result": probe(session, **message.get("args", {}))})
        else:
            raise SystemExit(f"unexpected message: {sorted(message)}")
    except Exception as err:  # noqa: BLE001 (the learner's code raised: reported, not fatal)
        session.send({"raised": learner_error(err), "not_implemented": isinstance(err, NotImplementedError)})
    finally:
        session.caller = outer


PROBES: dict[str, Any] = {}


def main() -> int:
    from . import wire
    from .perf_worker import protocol_streams

    replies, commands = protocol_streams(binary=True)
    encode, decode = wire.encode, wire.decode
    setup = decode(commands.readline())["setup"]

    import torch

    torch.set_num_threads(int(setup.get("threads") or 1))
    from .labs import load
    from .perf_worker import changed, module_state

    lab = load(setup["lab"])
    PROBES.update(lab.probes.PROBES)
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()  # cells may use magics or get_ipython(), as in the notebook
    baseline: dict[str, int] = {}

    def send(message: dict[str, Any]) -> None:
        # The flags go with the reply that ends each of the checker's requests, not with the messages of a
        # served model's call (a forward request, a cache update's reply): a snapshot of every module costs
        # more than the call itself, and a model call exchanges one message per layer.
        if baseline and not ("forward" in message or "kv" in message):
            message["tampered"] = changed(baseline, module_state())[:20]
        try:
            replies.write(encode(message))
        except wire.WireError as err:  # the learner's code returned something that is not plain data
            replies.write(encode({"raised": f"TypeError: {err}", "not_implemented": False}))

    def receive() -> dict[str, Any] | None:
        line = commands.readline()
        return decode(line) if line else None

    session = Session(send, receive, shell.user_ns)
    send({"ready": True})
    while True:
        message = receive()
        if message is None:
            return 0
        if "exec" in message:
            if not message.get("trusted") and not baseline:
                # After the lab's locked defining cells (restored from the source: trusted; they also let
                # torch finish wrapping itself), before any learner code: the snapshot the flags compare with.
                baseline.update(module_state())
            result = shell.run_cell(message["exec"], store_history=False)
            err = result.error_before_exec or result.error_in_exec
            send({"done": True, "raised": learner_error(err) if err is not None else ""})
            continue
        answer(session, message)


if __name__ == "__main__":
    sys.exit(main())
