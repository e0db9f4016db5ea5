"""grader.labs.paged_attention.grading: the checker's side of the paged_attention lab. Never in a sandbox nor a
learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed process reached
through the probes) and a seed drawn at grading time, computes what is expected here, and raises
`CheckFailed` with what to do next when the answer is wrong.

  PA1 scripted scenarios (fixed ones in the style of vLLM's prefix-caching tests, and random ones drawn from
      the seed) run on the learner's BlockAllocator in its process; every state that comes back is compared
      with the state `Allocator` below, the oracle, computes here: results, block tables, ref counts, free list.
  PA2 the checker's model drives the learner's PagedKVCache through block tables drawn here (each `update` is a
      call into the learner's process) and compares the logits with contiguous attention.
  PA3 as PA1 for PrefixCachingAllocator, with cached-token counts, eviction and a colliding hash.
  PA4 the checker drives PagedBatcher call by call on a served model, so it counts here the rows of every
      decode call (the concurrency), the prefills (the preemptions), and checks the tokens by teacher forcing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer

from ...checks import CheckFailed
from ...perf import threshold
from . import SPEC
from .public import (Batcher, PagedCache, batch_case, colliding_hash, verify_batcher, verify_paged_cache,
                     verify_scripts)

LAB = SPEC.name


# ------------------------------------------------------------------------------------------------ the oracle

@dataclass
class Block:
    refs: int = 0
    hash: int | None = None  # set while the block holds a full, registered run of tokens
    tokens: tuple[int, ...] | None = None


@dataclass
class Allocator:
    """The conventions of the notebook, as the checker's own bookkeeping (PA1; with `prefix`, PA3)."""

    num_blocks: int
    block_size: int
    prefix: bool = False
    hash_fn: Any = None
    blocks: list[Block] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    tables: dict[int, list[int]] = field(default_factory=dict)
    lengths: dict[int, list[int]] = field(default_factory=dict)  # seq -> its tokens
    cached: dict[int, int] = field(default_factory=dict)
    index: dict[int, int] = field(default_factory=dict)  # hash -> block

    def __post_init__(self):
        self.blocks = [Block() for _ in range(self.num_blocks)]
        self.free = list(range(self.num_blocks))
        self.hash_fn = self.hash_fn or (lambda parent, tokens: hash((parent, tuple(tokens))))

    def need(self, n: int) -> int:
        return (n + self.block_size - 1) // self.block_size

    def can_allocate(self, n: int) -> bool:
        return self.need(n) <= len(self.free)

    def take(self) -> int:
        b = self.free.pop(0)
        blk = self.blocks[b]
        if self.prefix and blk.hash is not None and self.index.get(blk.hash) == b:
            del self.index[blk.hash]
        self.blocks[b] = Block(refs=1)
        return b

    def register(self, b: int, parent: int, tokens) -> int:
        h = self.hash_fn(parent, tuple(tokens))
        self.blocks[b].hash, self.blocks[b].tokens = h, tuple(tokens)
        self.index[h] = b
        return h

    def allocate(self, seq: int, tokens: list[int]) -> list[int]:
        bs, table, parent, hits = self.block_size, [], -1, 0
        limit = (len(tokens) - 1) // bs if self.prefix else 0
        missed = False
        for i in range(self.need(len(tokens))):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            if not missed and i < limit:
                h = self.hash_fn(parent, chunk)
                b = self.index.get(h)
                if b is not None and self.blocks[b].tokens == chunk:
                    if self.blocks[b].refs == 0:
                        self.free.remove(b)
                    self.blocks[b].refs += 1
                    table.append(b)
                    parent, hits = h, hits + bs
                    continue
            missed = True
            b = self.take()
            table.append(b)
            if self.prefix and len(chunk) == bs:
                parent = self.register(b, parent, chunk)
        self.tables[seq], self.lengths[seq] = table, list(tokens)
        if self.prefix:
            self.cached[seq] = hits
        return list(table)

    def can_append(self, seq: int) -> bool:
        table, n = self.tables[seq], len(self.lengths[seq])
        if n % self.block_size and self.blocks[table[-1]].refs == 1:
            return True
        return bool(self.free)

    def append(self, seq: int, token: int) -> list[int] | None:
        table, toks = self.tables[seq], self.lengths[seq]
        copy = None
        if len(toks) % self.block_size == 0:
            table.append(self.take())
        elif self.blocks[table[-1]].refs > 1:
            new = self.take()
            self.blocks[table[-1]].refs -= 1
            copy = [table[-1], new]
            table[-1] = new
        toks.append(token)
        if self.prefix and len(toks) % self.block_size == 0:
            parent = self.blocks[table[-2]].hash if len(table) > 1 else -1
            self.register(table[-1], parent, toks[-self.block_size:])
        return copy

    def fork(self, parent: int, child: int) -> list[int]:
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = list(self.lengths[parent])
        for b in self.tables[child]:
            self.blocks[b].refs += 1
        return list(self.tables[child])

    def release(self, seq: int) -> None:
        for b in self.tables.pop(seq)[::-1]:
            self.blocks[b].refs -= 1
            if self.blocks[b].refs == 0:
                self.free.append(b)
        del self.lengths[seq]

    def state(self) -> dict[str, Any]:
        out = {"free": list(self.free), "ref_counts": [b.refs for b in self.blocks],
               "tables": sorted([s, list(t)] for s, t in self.tables.items())}
        if self.prefix:
            out["cached"] = sorted([s, n] for s, n in self.cached.items() if s in self.tables)
        return out

    def apply(self, op: list[Any]) -> dict[str, Any]:
        name, *args = op
        method = {"free": self.release}.get(name) or getattr(self, name)
        result = method(*args)
        return {"result": result if name != "free" else None, **self.state()}


def expected_states(script: dict[str, Any]) -> list[dict[str, Any]]:
    oracle = Allocator(script["num_blocks"], script["block_size"], prefix=script.get("prefix", False),
                       hash_fn=colliding_hash if script.get("colliding_hash") else None)
    return [oracle.apply(op) for op in script["ops"]]


# ------------------------------------------------------------------------------------------------ the scripts

def _script(name: str, num_blocks: int, block_size: int, ops: list[list[Any]], prefix: bool = False,
            colliding: bool = False) -> dict[str, Any]:
    return {"name": name, "num_blocks": num_blocks, "block_size": block_size, "ops": ops, "prefix": prefix,
            "colliding_hash": colliding}


def fixed_pa1_scripts() -> list[dict[str, Any]]:
    """Hand-written scenarios: the basics, a fork with copy on write, running out of blocks."""
    seq = list(range(100, 140))
    return [
        _script("basics", 8, 4, [
            ["allocate", 1, seq[:10]], ["append", 1, 7], ["append", 1, 8], ["can_allocate", 20],
            ["allocate", 2, seq[:5]], ["append", 1, 9], ["free", 1], ["allocate", 3, seq[:9]], ["can_append", 3],
            ["free", 2], ["free", 3]]),
        _script("fork and copy on write", 8, 4, [
            ["allocate", 1, seq[:6]], ["fork", 1, 2], ["append", 2, 50], ["append", 1, 51], ["append", 1, 52],
            ["append", 2, 53], ["append", 2, 54], ["fork", 2, 3], ["free", 1], ["append", 3, 55], ["free", 2],
            ["free", 3]]),
        _script("out of blocks", 4, 2, [
            ["allocate", 1, seq[:4]], ["allocate", 2, seq[:3]], ["can_allocate", 1], ["can_append", 1],
            ["can_append", 2], ["append", 2, 60], ["can_append", 2], ["fork", 2, 3], ["can_append", 3],
            ["free", 1], ["can_append", 3], ["append", 3, 61], ["free", 2], ["free", 3]]),
    ]


def fixed_pa3_scripts() -> list[dict[str, Any]]:
    """Hand-written prefix-caching scenarios: reuse of a shared prefix, a prompt fully cached on a block boundary
    (nano-vllm #144), a block filled by append becoming shareable, eviction in free-list order, a preempted
    sequence whose prefix was cached coming back, and a colliding hash."""
    a = list(range(10, 26))  # four blocks of 4
    b = list(range(50, 66))
    return [
        _script("shared prefix", 10, 4, [
            ["allocate", 1, a[:10]], ["allocate", 2, a[:8] + [90, 91, 92]], ["free", 1],
            ["allocate", 3, a[:10]], ["free", 2], ["free", 3]], prefix=True),
        _script("prompt fully cached on a block boundary", 8, 4, [
            ["allocate", 1, a[:8]], ["allocate", 2, a[:8]], ["allocate", 3, a[:9]], ["free", 2],
            ["allocate", 4, a[:8]]], prefix=True),
        _script("appended block becomes shareable", 8, 4, [
            ["allocate", 1, a[:6]], ["append", 1, a[6]], ["append", 1, a[7]], ["allocate", 2, a[:9]],
            ["append", 2, 77], ["free", 1], ["free", 2]], prefix=True),
        _script("eviction order and a preempted prefix", 7, 4, [
            ["allocate", 1, a[:12]], ["allocate", 2, b[:9]], ["free", 1], ["allocate", 3, a[:5]],
            ["free", 2], ["allocate", 4, b[:9]], ["free", 4], ["allocate", 5, [1, 2, 3, 4, 5, 6, 7, 8]],
            ["allocate", 6, b[:9]], ["free", 3], ["free", 5], ["free", 6]], prefix=True),
        _script("colliding hash", 8, 4, [
            ["allocate", 1, [1, 2, 3, 4, 9]], ["allocate", 2, [4, 3, 2, 1, 9]], ["allocate", 3, [1, 2, 3, 4, 8]],
            ["free", 1], ["allocate", 4, [2, 2, 3, 3, 7]]], prefix=True, colliding=True),
    ]


def random_script(seed: int, prefix: bool) -> dict[str, Any]:
    """A random valid script: operations drawn from the seed, each checked against the oracle first, so it only
    allocates or appends when blocks are free (an impossible one becomes the can_ question instead)."""
    rng = np.random.default_rng(seed)
    bs, nb = int(rng.choice([2, 3, 4])), int(rng.integers(6, 13))
    oracle = Allocator(nb, bs, prefix=prefix)
    prompts = [rng.integers(0, 20, int(rng.integers(3, 14))).tolist() for _ in range(3)]
    ops, live, next_id = [], [], 1
    for _ in range(int(rng.integers(24, 36))):
        kind = rng.choice(["allocate", "append", "append", "fork", "free"] if not prefix
                          else ["allocate", "allocate", "append", "free"])
        if kind == "allocate" or not live:
            base = prompts[int(rng.integers(0, 3))]
            cut = int(rng.integers(1, len(base) + 1))
            tokens = base[:cut] + rng.integers(0, 20, int(rng.integers(0, 4))).tolist()
            op = ["allocate", next_id, tokens] if oracle.can_allocate(len(tokens)) else ["can_allocate", len(tokens)]
            if op[0] == "allocate":
                live.append(next_id)
                next_id += 1
        elif kind == "append":
            seq = live[int(rng.integers(0, len(live)))]
            op = ["append", seq, int(rng.integers(0, 20))] if oracle.can_append(seq) else ["can_append", seq]
        elif kind == "fork":
            parent = live[int(rng.integers(0, len(live)))]
            op = ["fork", parent, next_id]
            live.append(next_id)
            next_id += 1
        else:
            seq = live.pop(int(rng.integers(0, len(live))))
            op = ["free", seq]
        oracle.apply(op)
        ops.append(op)
        if live and rng.random() < 0.2:  # a question whose answer may be yes as well as no
            question = ["can_append", live[int(rng.integers(0, len(live)))]]
            oracle.apply(question)
            ops.append(question)
    return _script(f"random script (seed {seed})", nb, bs, ops, prefix=prefix)


def pa1_scripts(seed: int) -> list[dict[str, Any]]:
    return fixed_pa1_scripts() + [random_script(seed, prefix=False), random_script(seed + 1, prefix=False)]


def pa3_scripts(seed: int) -> list[dict[str, Any]]:
    return fixed_pa3_scripts() + [random_script(seed, prefix=True), random_script(seed + 1, prefix=True)]


def public_expected() -> dict[str, Any]:
    """What `public_expected.json` must hold: the public scripts and the states the oracle gives."""
    seed = SPEC.public_seed
    out = {}
    for task, scripts in (("PA1", pa1_scripts(seed)), ("PA3", pa3_scripts(seed))):
        out[task] = {"seed": seed, "scripts": scripts, "states": [expected_states(s) for s in scripts]}
    out["PA4"] = {"seed": seed, "reference_mean_concurrency": paged_schedule(batch_case(seed))["mean_concurrency"]}
    return out


# ------------------------------------------------------------------------------------------------ the learner, remotely

def hidden_pa1(learner, seed: int) -> dict[str, Any]:
    scripts = pa1_scripts(seed)
    return verify_scripts(lambda s: learner.call("run_script", cls="BlockAllocator", script=s), scripts,
                          [expected_states(s) for s in scripts], "PA1")


class RemotePagedCache(PagedCache):
    def __init__(self, learner, args: ModelArgs, num_blocks: int, block_size: int):
        self.learner, self.args = learner, args
        self.handle = learner.call("new_paged_cache", args=args.to_dict(), num_blocks=num_blocks,
                                   block_size=block_size)
        if not isinstance(self.handle, int):
            raise CheckFailed("PagedKVCache could not be created")

    def view(self, tables: list[list[int]]):
        handle = self.learner.call("view", cache=self.handle, tables=[list(t) for t in tables])
        if not isinstance(handle, int):
            raise CheckFailed("PagedKVCache.view could not be created")
        return self.learner.cache(handle, self.args)

    def copy_block(self, src: int, dst: int) -> None:
        self.learner.call("copy_block", cache=self.handle, src=src, dst=dst)

    def bytes(self) -> tuple[Any, int]:
        claimed, held = self.learner.call("cache_bytes", cache=self.handle)
        return claimed, held


def hidden_pa2(learner, seed: int) -> dict[str, Any]:
    return verify_paged_cache(lambda args, n, size: RemotePagedCache(learner, args, n, size), seed)


def hidden_pa3(learner, seed: int) -> dict[str, Any]:
    scripts = pa3_scripts(seed)
    return verify_scripts(lambda s: learner.call("run_script", cls="PrefixCachingAllocator", script=s), scripts,
                          [expected_states(s) for s in scripts], "PA3")


class RemoteBatcher(Batcher):
    """The learner's PagedBatcher in its sandbox, driven one call at a time; the model runs here."""

    def __init__(self, learner, model: Transformer, case: dict[str, Any]):
        self.learner = learner
        self.spec = learner.serve(model)
        handle = learner.call("new_batcher", model=self.spec, num_blocks=case["num_blocks"],
                              block_size=case["block_size"], max_batch_size=case["max_batch_size"])
        if not isinstance(handle, int):
            raise CheckFailed("PagedBatcher could not be created")
        self.handle = handle

    def add_request(self, request_id: int, prompt: list[int], max_new_tokens: int) -> None:
        self.learner.call("add_request", batcher=self.handle, request_id=request_id, prompt=prompt,
                          max_new_tokens=max_new_tokens)

    def step(self) -> tuple[dict[Any, Any], list[tuple[int, int]]]:
        served = self.learner.served(self.spec)
        before = len(served.calls)
        reply = self.learner.call("step", batcher=self.handle)
        calls = list(served.calls[before:])
        if not isinstance(reply, dict) or "produced" not in reply:
            said = reply.get("returned", "something else") if isinstance(reply, dict) else "something else"
            raise CheckFailed(f"step() must return a dict {{request_id: new token}}, got {said}")
        return {rid: token for rid, token in reply["produced"]}, calls

    def has_unfinished(self) -> bool:
        value = self.learner.call("has_unfinished", batcher=self.handle)
        if not isinstance(value, bool):
            raise CheckFailed(f"has_unfinished must be True or False, got {type(value).__name__}")
        return value

    def blocks(self) -> dict[int, int]:
        return {rid: n for rid, n in self.learner.call("blocks", batcher=self.handle)}

    def bytes(self) -> tuple[Any, int]:
        claimed, held = self.learner.call("batcher_bytes", batcher=self.handle)
        return claimed, held


def hidden_pa4(learner, seed: int) -> dict[str, Any]:
    from ..common import one_torch_thread

    bar = threshold(LAB, "PA4")["min_fraction_of_reference"]
    reference = paged_schedule(batch_case(seed))["mean_concurrency"]
    with one_torch_thread():
        return verify_batcher(lambda case, model: RemoteBatcher(learner, model, case), seed, reference, bar)


HIDDEN_CHECKS = {"PA1": hidden_pa1, "PA2": hidden_pa2, "PA3": hidden_pa3, "PA4": hidden_pa4}


# ------------------------------------------------------------------------------------------------ PA4's bar

def measure_admission(seeds: range = range(16)) -> dict[str, Any]:
    """The numbers PA4's bar is set from (counted, so the same on any machine), on the traces of `seeds`: the
    reference PagedBatcher's mean concurrency while requests wait (equal to `paged_schedule`'s, which the check
    uses), over contiguous max-length reservation's; and the same for a batcher that reserves len(prompt) +
    max_new_tokens up front (the `reserves-up-front` sample, its waste rule lifted), as a fraction of the
    reference's.

    Not named `calibrate`: nothing here is timed, so `inferlab calibrate` and the GPU check have nothing to measure.
    The bar is the geometric mean of the reference's fraction (1) and the reserving batcher's best fraction."""
    from .. import load
    from .public import LocalBatcher, batch_model, reservation_schedule, run_batch
    from .samples import RESERVES_UP_FRONT, edited

    ns = load(LAB).reference_namespace()
    reserving = dict(ns)
    exec(edited("pa4-solution", RESERVES_UP_FRONT), reserving)
    torch.set_grad_enabled(False)
    out: dict[str, list[float]] = {k: [] for k in ("reference_vs_reservation", "reference_vs_exact_reservation",
                                                    "reserving_fraction", "preemptions", "paged_waste",
                                                    "reservation_waste")}
    for seed in seeds:
        case = batch_case(seed)
        model = batch_model(case)
        contiguous, exact = reservation_schedule(case), reservation_schedule(case, exact=True)
        means = {}
        for name, space in (("reference", ns), ("reserves-up-front", reserving)):
            batcher = LocalBatcher(space["PagedBatcher"], model, case)
            try:
                run = run_batch(ReservingView(batcher) if name != "reference" else batcher, case)
            finally:
                batcher.close()
            means[name] = float(np.mean(run["pressed_rows"] or run["decode_rows"]))
            if name == "reference":
                if abs(means[name] - paged_schedule(case)["mean_concurrency"]) > 1e-9:
                    raise AssertionError(f"seed {seed}: paged_schedule disagrees with the reference batcher")
                out["preemptions"].append(run["prefills"] - len(case["requests"]))
                out["paged_waste"].append(round(run["paged_waste"], 3))
        out["reference_vs_reservation"].append(round(means["reference"] / contiguous["mean_concurrency"], 2))
        out["reference_vs_exact_reservation"].append(round(means["reference"] / exact["mean_concurrency"], 2))
        out["reserving_fraction"].append(round(means["reserves-up-front"] / means["reference"], 2))
        out["reservation_waste"].append(round(contiguous["waste"], 3))
    bar = round(float(np.sqrt(1.0 * max(out["reserving_fraction"]))), 2)
    return {"min_fraction_of_reference": bar, **out}


class ReservingView:
    """A LocalBatcher whose block counts are hidden from run_batch's waste rule (which the reserving batcher breaks
    by design), so its concurrency can be measured for the calibration."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def blocks(self) -> dict[int, int]:
        return {}


def paged_schedule(case: dict[str, Any]) -> dict[str, Any]:
    """The reference PagedBatcher's schedule, simulated from the lengths alone (without eos, tokens do not change
    it): the sequences each decode step carries, and the preemptions. The checker's own measure of what a paged
    batcher following the notebook's rules achieves on this trace, computed where no learner code runs."""
    bs, free = case["block_size"], case["num_blocks"]
    waiting = [[r, 0] for r in case["requests"]]  # [request, tokens generated]
    running: list[list[Any]] = []  # [request, tokens generated, tokens in the cache]
    rows, pressed, preemptions = [], [], 0

    def blocks(n: int) -> int:
        return -(-n // bs)

    while waiting or running:
        for seq in list(running):
            while seq in running and not (seq[2] % bs or free):
                victim = running.pop()
                free += blocks(victim[2])
                waiting.insert(0, victim[:2])
                preemptions += 1
            if seq in running:
                free -= 1 if seq[2] % bs == 0 else 0
                seq[2] += 1
        if running:
            rows.append(len(running))
            if any(w[1] == 0 for w in waiting):
                pressed.append(len(running))
            for seq in list(running):
                seq[1] += 1
                if seq[1] >= seq[0]["max_new_tokens"]:
                    running.remove(seq)
                    free += blocks(seq[2])
        while waiting and len(running) < case["max_batch_size"]:
            request, done = waiting[0]
            context = len(request["prompt"]) + done
            if blocks(context) > free:
                break
            waiting.pop(0)
            free -= blocks(context)
            if done + 1 >= request["max_new_tokens"]:
                free += blocks(context)
            else:
                running.append([request, done + 1, context])
    return {"mean_concurrency": float(np.mean(pressed or rows)), "preemptions": preemptions,
            "decode_steps": len(rows)}
