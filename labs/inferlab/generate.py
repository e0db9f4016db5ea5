"""inferlab.generate: token sampling and the naive generation baseline.

`naive_generate` runs the *whole* sequence through the model for every new token, with
no cache: each step costs a full prefill of everything so far. It is deliberately slow and
obviously right, which makes it the baseline every lab compares against, for speed and
for equality of outputs.

Reproducibility contract, relied on by the labs' checks: `sample` draws exactly one
random number per row per call (none when greedy) from the given `torch.Generator`. Any
generation loop that produces the same logits and calls `sample` once per step with a
generator seeded the same way produces the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .model import Transformer


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A private RNG for sampling, so results do not depend on global torch state."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    return gen


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next tokens from logits [B, V] (or [V]); returns [B] (or a 0-d tensor).

    temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
    restricted to the `top_k` most likely tokens and/or the smallest set whose
    probability reaches `top_p` (nucleus), renormalised, and one token drawn per row.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    squeeze = logits.dim() == 1
    logits = logits.float().view(-1, logits.shape[-1])  # [B, V]
    if temperature == 0.0:
        out = logits.argmax(dim=-1)
        return out[0] if squeeze else out
    probs = filtered_probs(logits / temperature, top_k, top_p)  # [B, V]
    out = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return out[0] if squeeze else out


def filtered_probs(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Softmax of logits [B, V] after top-k and top-p filtering (the distribution `sample` draws from)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def check_length(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    """Fail early, naming both lengths, when a request cannot fit the model's context."""
    ctx = model.args.max_seq_len
    if prompt_len == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len >= ctx:
        raise ValueError(f"the prompt is {prompt_len} tokens but the model's context is {ctx} tokens; shorten it")
    if prompt_len + max_new_tokens > ctx:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{ctx} tokens; ask for at most {ctx - prompt_len} new tokens"
        )


@torch.inference_mode()
def naive_generate_stream(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                          eos_id: int | None = None) -> Iterator[int]:
    """Yield new tokens one at a time, recomputing the full sequence at every step."""
    check_length(model, len(prompt), max_new_tokens)
    device = model.embed_tokens.weight.device
    gen = make_generator(seed, device)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    for _ in range(max_new_tokens):
        logits = model(tokens)[:, -1]  # [1, V]: the whole prefix is recomputed, every step
        nxt = sample(logits, temperature, top_k, top_p, gen)  # [1]
        yield int(nxt)
        if eos_id is not None and int(nxt) == eos_id:
            return
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)


def naive_generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   eos_id: int | None = None) -> list[int]:
    """The new tokens (prompt excluded) of the recompute-everything baseline; stops after `eos_id`."""
    return list(naive_generate_stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, eos_id))
