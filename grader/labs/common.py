"""grader.labs.common: helpers the labs' checks share. The one place they live; labs never import each other.

Nothing here answers a task: these build inputs (random architectures and models) and read what
came back (token lists), on both sides (a notebook's self-checks and the checker).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer

from ..checks import CheckFailed


def random_args(rng: np.random.Generator, max_seq_len: int = 128) -> ModelArgs:
    """A small random architecture: GQA or MHA, various head counts, so a hard-coded shape fails."""
    n_kv = int(rng.choice([1, 2, 4]))
    n_heads = n_kv * int(rng.choice([1, 2, 4]))
    head_dim = int(rng.choice([8, 16]))
    return ModelArgs(vocab_size=int(rng.integers(50, 120)), dim=n_heads * head_dim, n_layers=int(rng.integers(1, 4)),
                     n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=int(rng.integers(16, 64)), max_seq_len=max_seq_len)


def random_model(args: ModelArgs, seed: int) -> Transformer:
    """Random weights, large enough (std 0.2) that any position or cache mistake changes the argmax."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def as_tokens(tokens: Any, what: str) -> list[int]:
    """Plain ints: an int subclass that claims to equal anything must not pass a comparison."""
    try:
        return [int.__index__(t) if isinstance(t, int) else int(t) for t in tokens]
    except (TypeError, ValueError) as err:
        raise CheckFailed(f"{what} must be a list of token ids (ints); got {type(tokens).__name__} ({err})") from None


def model_fingerprint(model: Transformer) -> tuple:
    """The model's structure and a checksum of its weights, to notice code that edits the model."""
    with torch.no_grad():
        return (repr(model.args), len(list(model.modules())),
                tuple((name, tuple(p.shape), float(p.double().sum())) for name, p in model.named_parameters()))


def tensor_bytes_held(obj: Any) -> int:
    """Bytes of every distinct tensor storage reachable from an object's attributes (one level of containers)."""
    seen, total = set(), 0
    values = list(vars(obj).values())
    for v in list(values):
        if isinstance(v, (list, tuple)):
            values.extend(v)
        elif isinstance(v, dict):
            values.extend(v.values())
    for v in values:
        if isinstance(v, torch.Tensor):
            ptr = v.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += v.untyped_storage().nbytes()
    return total


class PositionCounter:
    """Counts the token positions a model processes (batch rows x new tokens, summed over calls), in-process.

    The self-checks use it; the autograder counts on its own side instead, where the model runs
    (`grader.check_stage`), so the learner's process cannot change the count."""

    def __init__(self, model: Transformer):
        self.positions = 0
        self.fed: list[int] = []  # the positions of batch row 0, in the order they were fed (`positions_fed`)
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens")
        input_pos = args[1] if len(args) > 1 else kwargs.get("input_pos")
        self.positions += int(tokens.numel())
        self.fed += positions_fed(tokens, input_pos)

    def close(self) -> None:
        self._hook.remove()


def positions_fed(tokens, input_pos) -> list[int]:
    """The positions one forward call feeds for batch row 0: `input_pos` ([T] or [B, T]), or 0..T-1 without it
    (the model's default)."""
    if input_pos is None:
        return list(range(int(tokens.shape[-1])))
    row = input_pos if input_pos.dim() == 1 else input_pos[0]
    return [int(x) for x in row.reshape(-1).tolist()]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch thread, then restore the count: on a busy machine a second thread waits for
    whichever core is taken elsewhere, so small matrices run slower and far less steadily split than whole."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
