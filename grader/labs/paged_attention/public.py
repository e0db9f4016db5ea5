"""grader.labs.paged_attention.public: the paged_attention lab's checks (book ch. 5-6), tasks PA1 to PA4, as a notebook
sees them.

The notebook imports this module as `checks`. Each `check_paN` runs the learner's code here, on the public
seed. Where an expected value would answer a task (the allocator's exact states after each operation of a
script), it is read from `public_expected.json`, written by `inferlab release` from the grading side; this
module holds no allocator. The autograder runs the same `verify_*` functions in its own process, on scripts
and seeds drawn at grading time, against the learner's code in a sandboxed process (`grading.py`).

The learner's surface, fixed by the notebook:
  PA1 `BlockAllocator(num_blocks, block_size)`: `free_block_ids`, `ref_counts`, `block_tables`,
      `can_allocate(num_tokens)`, `allocate(seq_id, token_ids)`, `can_append(seq_id)`,
      `append(seq_id, token_id) -> (src, dst) | None`, `fork(parent_id, child_id)`, `free(seq_id)`.
  PA2 `PagedKVCache(args, num_blocks, block_size, dtype, device)`: `view(block_tables)` (a KVCache for one
      forward pass), `copy_block(src, dst)`, `nbytes`.
  PA3 `PrefixCachingAllocator(BlockAllocator)`: the same, plus `num_cached_tokens`, hashes computed with
      `self.block_hash(parent_hash, token_ids)`.
  PA4 `PagedBatcher(model, num_blocks, block_size, max_batch_size, eos_id=None)`: `add_request`, `step`,
      `has_unfinished`, `allocator`, `cache`.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer

from ...checks import CheckFailed
from ..common import random_args, random_model, tensor_bytes_held

LAB = "paged_attention"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")
GREEDY_TOLERANCE = 1e-4  # relative: a token is greedy if its logit is within 1e-4 * (1 + |top logit|) of the top


def public_expected() -> dict[str, Any]:
    """The stored scripts and expected states of the public inputs (written by the grader at release time)."""
    return json.loads(EXPECTED_PATH.read_text())


# ------------------------------------------------------------------------------------------------ PA1, PA3: scripts

def colliding_hash(parent_hash: int, token_ids) -> int:
    """A deliberately weak block hash for collision scripts: blocks whose tokens have the same sum collide. The
    allocator must still tell them apart by comparing tokens."""
    return (int(parent_hash) * 31 + sum(int(t) for t in token_ids)) % 7


def _index(value: Any, what: str) -> int:
    try:
        return operator.index(value)  # int, numpy and 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


def _ints(values: Any, what: str) -> list[int]:
    if values is None:
        raise TypeError(f"{what} must be a list of ints, got None")
    return [_index(v, f"each item of {what}") for v in list(values)]


def _result(op: str, value: Any) -> Any:
    """An operation's return value as plain data."""
    if op in ("allocate", "fork"):
        return _ints(value, f"{op}()'s block table")
    if op == "append":
        return None if value is None else _ints(value, "append()'s (src, dst)")
    if op in ("can_allocate", "can_append"):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{op}() must return True or False, got {type(value).__name__}")
        return bool(value)
    return None  # free() returns nothing worth checking


def snapshot(allocator: Any, prefix: bool) -> dict[str, Any]:
    """The allocator's bookkeeping as plain data: free list (front first), ref counts, block tables."""
    state = {"free": _ints(allocator.free_block_ids, "free_block_ids"),
             "ref_counts": _ints(allocator.ref_counts, "ref_counts"),
             "tables": sorted([_index(s, "a block_tables key"), _ints(t, f"block_tables[{s}]")]
                              for s, t in dict(allocator.block_tables).items())}
    if prefix:
        state["cached"] = sorted([_index(s, "a num_cached_tokens key"), _index(n, f"num_cached_tokens[{s}]")]
                                 for s, n in dict(allocator.num_cached_tokens).items()
                                 if s in allocator.block_tables)
    return state


def run_script(allocator_cls: Any, script: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a script's operations on a new allocator; after each, what it returned and the allocator's state.

    Runs where the learner's code runs (the notebook, or the sandbox when graded); returns plain data only."""
    cls = allocator_cls
    if script.get("colliding_hash"):  # the same class, with a hash that collides on purpose
        cls = type(f"Colliding{allocator_cls.__name__}", (allocator_cls,),
                   {"block_hash": staticmethod(colliding_hash)})
    allocator = cls(script["num_blocks"], script["block_size"])
    states = []
    for name, *operands in script["ops"]:
        try:
            value = getattr(allocator, name)(*operands)
            state = {"result": _result(name, value), **snapshot(allocator, script.get("prefix", False))}
        except NotImplementedError:
            raise
        except Exception as err:  # noqa: BLE001 (the learner's code raised: the check says at which operation)
            state = {"raised": f"{type(err).__name__}: {err}"[:300]}
        states.append(state)
        if "raised" in state:
            break
    return states


def describe(op: list[Any]) -> str:
    name, *operands = op
    shown = [f"<{len(o)} tokens>" if isinstance(o, list) and len(o) > 6 else repr(o) for o in operands]
    return f"{name}({', '.join(shown)})"


HINTS = {
    "result": ("allocate and fork return the sequence's block table; append returns (src, dst) only when it copied a "
               "shared last block, else None; can_allocate/can_append say whether enough blocks are free"),
    "free": ("allocation takes the block at the front of free_block_ids; free() walks a table from its last block "
             "to its first and puts each block whose count reaches 0 at the back"),
    "ref_counts": ("a block's count is the number of tables holding it: fork adds one to each shared block, copy on "
                   "write moves one reference from the shared block to the new copy, free takes one away"),
    "tables": ("a table lists a sequence's blocks in position order; append takes a new block when the last one is "
               "full, and replaces a shared last block by a copy before writing into it"),
    "cached": ("num_cached_tokens counts the prompt tokens found in the cache: whole blocks, from the start, stopping "
               "at the first miss and never including the block of the last token"),
}


def verify_script(states: Any, script: dict[str, Any], expected: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Every operation returns what the conventions say and leaves exactly the expected bookkeeping."""
    if not isinstance(states, list):
        raise CheckFailed(f"the script's states came back as {type(states).__name__}, not a list")
    for i, (op, want) in enumerate(zip(script["ops"], expected)):
        where = f"{script['name']}, operation {i + 1} of {len(script['ops'])}, {describe(op)}"
        if i >= len(states):
            raise CheckFailed(f"{where}: no state came back")
        got = states[i]
        if "raised" in got:
            raise CheckFailed(f"{where} raised {got['raised']}: every operation of the script is valid under the "
                              "conventions (it only allocates or appends after can_allocate/can_append say yes)")
        for field in ("result", "tables", "ref_counts", "free", "cached"):
            if field in want and got.get(field) != want[field]:
                shown = {"free": "free_block_ids", "tables": "block_tables"}.get(field, field)
                raise CheckFailed(f"{where}: {shown} is {_short(got.get(field))}, expected {_short(want[field])}: "
                                  f"{HINTS[field]}", operation=i + 1)
    return {"scripts_operations": len(script["ops"])}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def verify_scripts(run: Callable[[dict[str, Any]], Any], scripts: list[dict[str, Any]],
                   expected: list[list[dict[str, Any]]], task: str) -> dict[str, Any]:
    operations = 0
    for script, want in zip(scripts, expected):
        verify_script(run(script), script, want, task)
        operations += len(script["ops"])
    return {"scripts": len(scripts), "operations": operations}


def check_pa1(allocator_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """PA1 self-check: BlockAllocator's exact bookkeeping on the public scripts."""
    stored = public_expected()["PA1"]
    if seed != stored["seed"]:
        raise ValueError(f"expected states are stored for seed {stored['seed']} only")
    return verify_scripts(lambda s: run_script(allocator_cls, s), stored["scripts"], stored["states"], "PA1")


def check_pa3(allocator_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """PA3 self-check: PrefixCachingAllocator's exact bookkeeping (hits, cached tokens, eviction) on the public
    scripts, one of them with a hash that collides on purpose."""
    stored = public_expected()["PA3"]
    if seed != stored["seed"]:
        raise ValueError(f"expected states are stored for seed {stored['seed']} only")
    return verify_scripts(lambda s: run_script(allocator_cls, s), stored["scripts"], stored["states"], "PA3")


# ------------------------------------------------------------------------------------------------ PA2: the paged cache

def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype = torch.float32) -> int:
    """The kv_cache lab's formula: K and V, every layer, n_kv_heads x head_dim elements per token."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.tensor([], dtype=dtype).element_size()


class PagedCache:
    """What the PA2 check needs of a paged cache: a KVCache view for some block tables, a block copy, its bytes."""

    def view(self, tables: list[list[int]]) -> Any: ...

    def copy_block(self, src: int, dst: int) -> None: ...

    def bytes(self) -> tuple[Any, int]: ...  # (what nbytes claims, what its tensors hold)


class LocalPagedCache(PagedCache):
    def __init__(self, cache_cls: Any, args: ModelArgs, num_blocks: int, block_size: int):
        self.cache = cache_cls(args, num_blocks, block_size)

    def view(self, tables: list[list[int]]) -> Any:
        return self.cache.view([list(t) for t in tables])

    def copy_block(self, src: int, dst: int) -> None:
        self.cache.copy_block(src, dst)

    def bytes(self) -> tuple[Any, int]:
        return self.cache.nbytes, tensor_bytes_held(self.cache)


def paged_case(seed: int) -> dict[str, Any]:
    """A random model, rows of drawn lengths, a drawn block size, and block tables made of shuffled block ids
    (exactly the blocks the rows need, plus one spare for the copy on write)."""
    rng = np.random.default_rng(seed)
    args = random_args(rng)
    if args.n_layers < 2:  # two layers at least: a block copy must copy every layer
        args = ModelArgs(**{**args.to_dict(), "n_layers": 2})
    block_size = int(rng.choice([2, 4, 8, 16]))
    rows, steps = int(rng.integers(2, 5)), int(rng.integers(6, 12))
    prompts = [int(n) for n in rng.integers(1, 30, rows)]
    totals = [p + steps for p in prompts]
    needed = [-(-n // block_size) for n in totals]
    ids = rng.permutation(sum(needed) + 1).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(ids[at:at + n])
        at += n
    tokens = [rng.integers(0, args.vocab_size, n + 1).tolist() for n in totals]
    return dict(args=args, block_size=block_size, prompts=prompts, steps=steps, totals=totals, tables=tables,
                spare=ids[-1], num_blocks=sum(needed) + 1, tokens=tokens, model_seed=seed)


def _compare(got: torch.Tensor, want: torch.Tensor, what: str, case: dict[str, Any]) -> float:
    err = float((got - want).abs().max())
    if not torch.isfinite(got).all() or err > 1e-4:
        raise CheckFailed(
            f"logits of {what} differ from contiguous attention (recomputing the sequence) by {err:.3g} "
            f"(block_size={case['block_size']}, block tables {case['tables']}): position p of a row lives in block "
            "block_tables[row][p // block_size] at offset p % block_size; write the new keys and values there and "
            "return every row's blocks gathered in table order, so that slot j holds position j", max_abs_error=err)
    return err


@torch.no_grad()
def verify_paged_cache(new_cache: Callable[[ModelArgs, int, int], PagedCache], seed: int) -> dict[str, Any]:
    """Prefill each row through its own block table, decode all rows together at their own positions, then copy a
    row's last block on write: the logits equal recomputing each sequence (contiguous attention). The cache
    holds exactly its blocks' bytes."""
    case = paged_case(seed)
    args, size, tables = case["args"], case["block_size"], case["tables"]
    model = random_model(args, case["model_seed"])
    want = [model(torch.tensor([t[:n]]))[0] for t, n in zip(case["tokens"], case["totals"])]  # each [n, V]
    cache = new_cache(args, case["num_blocks"], size)
    worst = 0.0
    for b, (p, t) in enumerate(zip(case["prompts"], case["tokens"])):
        got = model(torch.tensor([t[:p]]), torch.arange(p), cache.view([tables[b]]))[0]  # [p, V]
        worst = max(worst, _compare(got, want[b][:p], f"row {b}'s prefill ({p} tokens, table {tables[b]})", case))
    for i in range(case["steps"]):
        positions = [p + i for p in case["prompts"]]
        tokens = torch.tensor([[t[pos]] for t, pos in zip(case["tokens"], positions)])  # [B, 1]
        got = model(tokens, torch.tensor(positions)[:, None], cache.view(tables))[:, 0]  # [B, V]
        for b, pos in enumerate(positions):
            worst = max(worst, _compare(got[b], want[b][pos], f"row {b} at position {pos} (decoding all "
                                        f"{len(tables)} rows together, each at its own position)", case))
    # Copy on write: row 0 forks at a position q that is not the first of its block (so the copy carries slots the
    # fork reads); the fork's block of q becomes a copy, and the fork writes another token at q into it.
    row = case["tokens"][0]
    q = case["totals"][0] - 1 if (case["totals"][0] - 1) % size else case["totals"][0] - 2
    shared = tables[0][q // size]
    fork = tables[0][:q // size] + [case["spare"]]
    cache.copy_block(shared, case["spare"])
    other = (row[q] + 1) % args.vocab_size
    got = model(torch.tensor([[other]]), torch.tensor([q]), cache.view([fork]))[0, 0]
    expected = model(torch.tensor([row[:q] + [other]]))[0, q]
    try:
        worst = max(worst, _compare(got, expected, f"a fork of row 0 after copy_block({shared}, {case['spare']}) "
                                    f"writing position {q}", case))
    except CheckFailed as err:
        raise CheckFailed(err.message + "; copy_block(src, dst) copies every layer's keys and values of block src "
                          "into block dst", **err.measured) from None
    got = model(torch.tensor([[row[q]]]), torch.tensor([q]), cache.view([tables[0][:q // size + 1]]))[0, 0]
    try:
        worst = max(worst, _compare(got, want[0][q], "row 0 after its fork wrote into the copy", case))
    except CheckFailed as err:
        raise CheckFailed(err.message + "; copy_block must leave block src as it was", **err.measured) from None
    claimed, held = cache.bytes()
    formula = case["num_blocks"] * size * kv_bytes_per_token(args)
    if not isinstance(claimed, int) or claimed != held:
        raise CheckFailed(f"cache.nbytes says {claimed!r} bytes but its tensors hold {held}: compute nbytes from "
                          "the tensors you allocated", held=held)
    if held != formula:
        raise CheckFailed(f"a cache of {case['num_blocks']} blocks of {size} slots holds {held} bytes; its blocks "
                          f"need {formula} (2 x n_layers x n_kv_heads x head_dim x 4 bytes per slot): allocate the "
                          "pool [n_layers, num_blocks, n_kv_heads, block_size, head_dim] for K and for V, nothing "
                          "per sequence", held=held, formula=formula)
    stored = sum(case["totals"])
    slots = sum(len(t) for t in tables) * size
    return {"max_abs_error": worst, "rows": len(tables), "block_size": size, "tokens_stored": stored,
            "slots_in_their_blocks": slots, "waste_tokens": slots - stored,
            "most_waste_allowed": len(tables) * (size - 1)}


def check_pa2(cache_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """PA2 self-check: attention through your PagedKVCache's block tables equals contiguous attention."""
    return verify_paged_cache(lambda args, n, size: LocalPagedCache(cache_cls, args, n, size), seed)


# ------------------------------------------------------------------------------------------------ PA4: the batcher

BATCH_REQUESTS, BATCH_BLOCK_SIZE, BATCH_NUM_BLOCKS, BATCH_MAX_SIZE = 16, 8, 32, 16
BATCH_MAX_NEW_TOKENS = 80  # the trace's cap on output lengths: what a server's max_tokens would be


def batch_case(seed: int) -> dict[str, Any]:
    """A random model of a drawn shape (its logits react strongly to any cache mistake) and a heavy-tailed trace:
    log-normal prompt and output lengths, as `inferlab.workloads.request_trace` draws them, all requests waiting
    at once, under a KV budget of BATCH_NUM_BLOCKS blocks: about a third of what they need at their longest."""
    from inferlab.workloads import LengthDist

    rng = np.random.default_rng(seed)
    args = random_args(rng)
    prompts = LengthDist(20, 0.6, 8, 48).draw(rng, BATCH_REQUESTS)
    outputs = LengthDist(12, 1.0, 2, BATCH_MAX_NEW_TOKENS).draw(rng, BATCH_REQUESTS)
    requests = [dict(id=i, prompt=rng.integers(0, args.vocab_size, int(p)).tolist(), max_new_tokens=int(n))
                for i, (p, n) in enumerate(zip(prompts, outputs))]
    return dict(args=args, model_seed=seed, block_size=BATCH_BLOCK_SIZE, num_blocks=BATCH_NUM_BLOCKS,
                max_batch_size=BATCH_MAX_SIZE, requests=requests)


def batch_model(case: dict[str, Any]) -> Transformer:
    return random_model(case["args"], case["model_seed"])


def reservation_schedule(case: dict[str, Any], exact: bool = False) -> dict[str, Any]:
    """The same requests under the same KV budget with contiguous max-length reservation: a request is admitted
    only when len(prompt) + BATCH_MAX_NEW_TOKENS slots are free (a server does not know how long an answer will
    be, only its cap), and holds them until it finishes. With `exact`, it reserves len(prompt) + max_new_tokens,
    the request's real final length, which only an oracle knows in advance. Same step structure as PagedBatcher
    (decode the running requests, then admit in order; a prefill gives the first token). The concurrency is the
    mean number of sequences per decode step while some request still waits to start: what the budget decides."""
    budget = case["num_blocks"] * case["block_size"]
    waiting = list(case["requests"])
    running: list[list[Any]] = []  # [request, tokens generated, slots reserved]
    rows, pressed, held, used = [], [], 0, []
    while waiting or running:
        if running:
            rows.append(len(running))
            if waiting:  # requests wait for memory: what the budget decides
                pressed.append(len(running))
            for r in running:
                r[1] += 1
            used.append((sum(len(r[0]["prompt"]) + r[1] - 1 for r in running), sum(r[2] for r in running)))
            running = [r for r in running if r[1] < r[0]["max_new_tokens"]]
        held = sum(r[2] for r in running)
        while waiting and len(running) < case["max_batch_size"]:
            need = len(waiting[0]["prompt"]) + (waiting[0]["max_new_tokens"] if exact else BATCH_MAX_NEW_TOKENS)
            if held + need > budget:
                break
            request = waiting.pop(0)
            running.append([request, 1, need])
            held += need
            if request["max_new_tokens"] <= 1:
                running.pop()
                held -= need
    stored, reserved = sum(s for s, _ in used), sum(r for _, r in used)
    return {"decode_steps": len(rows), "mean_concurrency": float(np.mean(pressed or rows)) if rows else 0.0,
            "mean_concurrency_all_steps": float(np.mean(rows)) if rows else 0.0,
            "peak_concurrency": max(rows, default=0), "waste": 1 - stored / reserved if reserved else 0.0}


class Batcher:
    """What the PA4 check needs of a batcher: add_request, step (with the model calls it made), has_unfinished,
    each request's number of blocks, and the cache's bytes."""

    def add_request(self, request_id: int, prompt: list[int], max_new_tokens: int) -> None: ...

    def step(self) -> tuple[dict[Any, Any], list[tuple[int, int]]]: ...

    def has_unfinished(self) -> bool: ...

    def blocks(self) -> dict[int, int]: ...

    def bytes(self) -> tuple[Any, int]: ...


class LocalBatcher(Batcher):
    """The learner's PagedBatcher in this process, the model's calls recorded by a forward hook."""

    def __init__(self, batcher_cls: Any, model: Transformer, case: dict[str, Any]):
        self.batcher = batcher_cls(model, case["num_blocks"], case["block_size"], case["max_batch_size"])
        self.calls: list[tuple[int, int]] = []
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        tokens = args[0] if args else kwargs["tokens"]
        self.calls.append((int(tokens.shape[0]), int(tokens.shape[1])))

    def add_request(self, request_id: int, prompt: list[int], max_new_tokens: int) -> None:
        self.batcher.add_request(request_id, list(prompt), max_new_tokens)

    def step(self) -> tuple[dict[Any, Any], list[tuple[int, int]]]:
        before = len(self.calls)
        produced = self.batcher.step()
        return produced, self.calls[before:]

    def has_unfinished(self) -> bool:
        return bool(self.batcher.has_unfinished)

    def blocks(self) -> dict[int, int]:
        return {rid: len(t) for rid, t in dict(self.batcher.allocator.block_tables).items()}

    def bytes(self) -> tuple[Any, int]:
        return self.batcher.cache.nbytes, tensor_bytes_held(self.batcher.cache)

    def close(self) -> None:
        self._hook.remove()


@torch.no_grad()
def greedy_mismatch(model: Transformer, prompt: list[int], tokens: list[int]) -> str:
    """'' if every token is the greedy choice after the prompt and the tokens before it (one recomputed forward
    pass, teacher forcing); else the first that is not."""
    if not tokens:
        return "no tokens were generated"
    if max(tokens) >= model.args.vocab_size or min(tokens) < 0:
        return f"token ids must be in 0..{model.args.vocab_size - 1}"
    logits = model(torch.tensor([list(prompt) + tokens[:-1]]))[0, len(prompt) - 1:]  # [n, V]
    top = logits.max(dim=-1).values
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    wrong = (top - chosen > GREEDY_TOLERANCE * (1 + top.abs())).nonzero()
    if len(wrong):
        i = int(wrong[0])
        return f"new token {i} is {tokens[i]} where greedy generation gives {int(logits[i].argmax())}"
    return ""


def run_batch(batcher: Batcher, case: dict[str, Any]) -> dict[str, Any]:
    """Every request added at once, then step() until none is left; what came out, step by step."""
    requests = {r["id"]: r for r in case["requests"]}
    for r in case["requests"]:
        batcher.add_request(r["id"], r["prompt"], r["max_new_tokens"])
    out: dict[int, list[int]] = {rid: [] for rid in requests}
    decode_rows, pressed, prefills, worst_waste, steps = [], [], 0, 0, 0
    paged_stored, paged_slots = 0, 0
    limit = 4 * sum(r["max_new_tokens"] for r in case["requests"]) + 50
    while batcher.has_unfinished():
        steps += 1
        if steps > limit:
            raise CheckFailed(f"after {limit} steps requests are still unfinished: every step must make progress "
                              "(decode the running requests, admit when blocks are free)")
        produced, calls = batcher.step()
        if not isinstance(produced, dict):
            raise CheckFailed(f"step() must return a dict {{request_id: new token}}, got {type(produced).__name__}")
        decodes = [rows for rows, width in calls if width == 1]
        if len(decodes) > 1:
            raise CheckFailed(f"step {steps} called the model {len(decodes)} times with one token per row: decode "
                              "every running request in one forward pass")
        if decodes and any(not out[rid] for rid in requests):  # some request has not started yet
            pressed += decodes
        decode_rows += decodes
        prefills += sum(1 for _, width in calls if width > 1)
        for rid, token in produced.items():
            rid = operator.index(rid) if hasattr(rid, "__index__") else rid
            if rid not in out:
                raise CheckFailed(f"step() produced a token for request {rid!r}, which was never added")
            out[rid].append(int.__index__(token) if isinstance(token, int) else _index(token, "a token"))
        bs = case["block_size"]
        blocks = batcher.blocks()
        for rid, n in blocks.items():
            if rid not in requests:
                raise CheckFailed(f"the allocator holds blocks for sequence {rid!r}, which is no request: use each "
                                  "request_id as its sequence id")
            have = len(requests[rid]["prompt"]) + len(out[rid])  # tokens known: the cache holds all but the newest
            allowed = -(-have // bs)
            if n > allowed:
                raise CheckFailed(
                    f"after step {steps} request {rid} holds {n} blocks of {bs} slots for {have} tokens (at most "
                    f"{allowed}): a paged cache takes a block only when a token needs a slot, so each sequence "
                    "wastes at most one partly filled block; do not reserve slots for tokens not generated yet",
                    blocks=n, allowed=allowed)
            paged_stored += have - 1
            paged_slots += n * bs
            worst_waste = max(worst_waste, n * bs - (have - 1))
        if sum(blocks.values()) > case["num_blocks"]:
            raise CheckFailed(f"the sequences hold {sum(blocks.values())} blocks of a pool of {case['num_blocks']}")
    return {"tokens": out, "decode_rows": decode_rows, "pressed_rows": pressed, "prefills": prefills, "steps": steps,
            "paged_waste": 1 - paged_stored / paged_slots if paged_slots else 0.0, "worst_waste_slots": worst_waste}


@torch.no_grad()
def verify_batcher(new_batcher: Callable[[dict[str, Any], Transformer], Batcher], seed: int,
                   reference_mean: float, min_fraction: float) -> dict[str, Any]:
    """PagedBatcher on a heavy-tailed trace under a fixed number of blocks: every request gets greedy generation's
    tokens, no sequence holds more than one partly filled block, the cache holds exactly its pool, and the mean
    number of sequences decoded per step while requests wait is at least `min_fraction` of what the notebook's
    rules give on this trace (`reference_mean`, computed by the caller), which is several times what contiguous
    max-length reservation reaches under the same budget (reported, with the waste of both)."""
    case = batch_case(seed)
    model = batch_model(case)
    batcher = new_batcher(case, model)
    try:
        claimed, held = batcher.bytes()
        run = run_batch(batcher, case)
    finally:
        close = getattr(batcher, "close", None)
        if close is not None:
            close()
    formula = case["num_blocks"] * case["block_size"] * kv_bytes_per_token(model.args)
    if not isinstance(claimed, int) or claimed != held or held != formula:
        raise CheckFailed(f"the batcher's cache holds {held} bytes (nbytes says {claimed!r}); {case['num_blocks']} "
                          f"blocks of {case['block_size']} slots are {formula} bytes: build the PagedKVCache with "
                          "the num_blocks and block_size the batcher was given", held=held, formula=formula)
    for r in case["requests"]:
        got = run["tokens"][r["id"]]
        if len(got) != r["max_new_tokens"]:
            raise CheckFailed(f"request {r['id']} got {len(got)} tokens for max_new_tokens={r['max_new_tokens']}: "
                              "each request produces exactly one token per step until it has them all, also "
                              "across a preemption (keep its tokens and prefill prompt + tokens when readmitted)")
        problem = greedy_mismatch(model, r["prompt"], got)
        if problem:
            raise CheckFailed(f"request {r['id']} ({len(r['prompt'])}-token prompt): {problem}: write each position "
                              "through the request's block table, and after a preemption prefill its prompt and "
                              "the tokens it already has", request=r["id"])
    if not run["decode_rows"]:
        raise CheckFailed("no step decoded: every step feeds each running request's newest token")
    contiguous, exact = reservation_schedule(case), reservation_schedule(case, exact=True)
    mean = float(np.mean(run["pressed_rows"] or run["decode_rows"]))  # all steps if nobody ever waited
    ratio = mean / contiguous["mean_concurrency"]
    fraction = mean / reference_mean
    measured = {"mean_concurrency": round(mean, 2), "reference_mean_concurrency": round(reference_mean, 2),
                "fraction_of_reference": round(fraction, 2), "bar": min_fraction,
                "peak_concurrency": max(run["decode_rows"]),
                "reservation_mean_concurrency": round(contiguous["mean_concurrency"], 2),
                "concurrency_vs_reservation": round(ratio, 2),
                "concurrency_vs_exact_reservation": round(mean / exact["mean_concurrency"], 2),
                "decode_steps": len(run["decode_rows"]), "reservation_decode_steps": contiguous["decode_steps"],
                "preemptions": run["prefills"] - len(case["requests"]),
                "paged_waste": round(run["paged_waste"], 3), "reservation_waste": round(contiguous["waste"], 3)}
    if fraction < min_fraction:
        raise CheckFailed(
            f"under {case['num_blocks']} blocks of {case['block_size']} slots your batcher decoded {mean:.2f} "
            f"sequences per step on average while requests waited; the notebook's rules give {reference_mean:.2f} "
            f"on this trace ({fraction:.0%}; the bar is {min_fraction:.0%}), and reserving len(prompt) + "
            f"{BATCH_MAX_NEW_TOKENS} slots (the output cap) per request gives {contiguous['mean_concurrency']:.2f}. "
            "Admit a request as soon as the blocks for its context are free, take blocks one at a time as tokens "
            "arrive, and preempt (the latest admitted) only when a running request cannot append", **measured)
    return measured


def check_pa4(batcher_cls: Any, seed: int = PUBLIC_SEED, profile: str | None = None) -> dict[str, Any]:
    """PA4 self-check: PagedBatcher's tokens, blocks, bytes and concurrency against contiguous reservation."""
    from ...perf import threshold

    stored = public_expected()["PA4"]
    if seed != stored["seed"]:
        raise ValueError(f"the reference's concurrency is stored for seed {stored['seed']} only")
    bar = threshold(LAB, "PA4", profile)["min_fraction_of_reference"]
    return verify_batcher(lambda case, model: LocalBatcher(batcher_cls, model, case), seed,
                          stored["reference_mean_concurrency"], bar)
