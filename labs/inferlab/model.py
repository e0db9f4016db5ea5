"""inferlab.model: a Llama-architecture decoder in one readable file.

This is the model every lab optimises. It is deliberately plain: RMSNorm, rotary
position embeddings (RoPE), grouped-query attention (GQA), a SwiGLU MLP, optional
q/k/v biases (as in Qwen2) and tied or untied embeddings. It runs in fp32 or bf16.

Parameter names match Hugging Face's `LlamaForCausalLM` / `Qwen2ForCausalLM` (minus their
leading `model.`), so checkpoints load with a plain `load_state_dict`.

What the model does *not* contain is as important: no KV cache, no batching scheduler,
no quantization, no speculative decoding, no custom kernels. Those are the labs, and they
plug in through three seams instead of editing this file:

* a cache: any object with `KVCache.update`, passed to `Transformer.forward`;
* an attention function (`AttentionFn`): `Transformer(args, attention=fn)` or
  `model.set_attention(fn)`; `sdpa_attention` is the default and `reference_attention`
  the plain version that kernels are checked against;
* `replace_linears(model, make)`: swaps `nn.Linear` layers for, say, quantized ones.

Shape names used in comments:
    B batch, T new tokens in this call, S key/value slots visible to attention,
    H query heads, Hkv key/value heads, D head dimension, C model width (dim), V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    """Every number that defines the architecture. Validates itself on creation."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0 means dim // n_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Hugging Face "llama3" scaling, or None
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v projections
    out_bias: bool = False  # Llama's `attention_bias` also puts one on o_proj
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    arch: str = "llama"  # "llama" or "qwen2": only decides how the config is written back

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each key/value head among a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"arch={self.arch!r} is not supported; use 'llama' or 'qwen2'")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in NAMED_CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
        return cls(**NAMED_CONFIGS[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named configurations. `tiny` and `tiny-draft` are the course's own trained models;
# the others are published dimensions of real models, for memory and roofline exercises
# (build them with random weights, or load a real checkpoint if you have one).
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=704,
                 max_seq_len=512, rope_theta=10000.0, tie_embeddings=True),
    "tiny-draft": dict(vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352,
                       max_seq_len=512, rope_theta=10000.0, tie_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                        max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False),
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                         max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                         tie_embeddings=True, arch="qwen2"),
}


@runtime_checkable
class KVCache(Protocol):
    """The interface between attention and whatever holds past keys and values.

    The model calls `update` once per layer per forward pass, after RoPE has been
    applied to the new keys. The cache stores them and returns everything attention may
    look at. Convention: slot j of the returned tensors holds the key/value of position j,
    so the model can build the causal mask as `slot <= query position`. S may be exactly
    max(input_pos) + 1 or a fixed length (a static buffer, which keeps shapes constant for
    torch.compile); slots above a query's position are masked by causality.

    Slots at or below a query's position that hold nothing valid must be masked. Either the
    caller passes `attention_mask` to the forward, or the cache returns a third value, a key
    mask, which the model ANDs with it. A cache needs the key mask when it knows better than
    the caller which slots are live: rows of a batch with their own lengths or left padding
    that the cache skipped, slots filled out of order (blocks of a paged cache), slots freed
    by a rollback. Masked slots may hold any finite values (0 * NaN is NaN, even in a
    masked softmax).

    Args:
        layer: index of the decoder layer, 0..n_layers-1.
        input_pos: positions of the new tokens, [T] (same for every row) or [B, T].
        k, v: the new keys and values, [B, Hkv, T, D].
    Returns:
        (k_all, v_all), each [B, Hkv, S, D] with S > max(input_pos), or
        (k_all, v_all, key_mask) with key_mask [B, S] bool, False for slots not to attend.
    """

    def update(self, layer: int, input_pos: Tensor, k: Tensor,
               v: Tensor) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]: ...


class AttentionFn(Protocol):
    """The attention computation of one layer, pluggable (`Transformer(args, attention=fn)`).

    Args:
        q: queries, [B, H, T, D], RoPE applied.
        k, v: keys and values, [B, Hkv, S, D], as the cache returned them (or this call's own
            when there is no cache). Hkv divides H and the heads are *not* repeated: query head
            h uses key/value head h // (H // Hkv), so a kernel can read each K/V head once
            for its whole group.
        mask: [B, 1, T, S] bool, True where query t may attend to slot s. Causality, padding
            and the cache's key mask are all in it; every row has at least one True.
        scale: multiply q.k by this before the softmax (1 / sqrt(D)).
        **context: `layer` (int) and `cache` (the `KVCache` or None). Most functions ignore
            them; a paged-attention kernel reads its block pool and block table from `cache`
            for `layer` instead of taking k and v (see docs/runtime.md). New keys may be added,
            so accept `**context` even if unused.
    Returns:
        [B, H, T, D] in q's dtype.
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: float,
                 **context: Any) -> Tensor: ...


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: float, **context: Any) -> Tensor:
    """The default `AttentionFn`: PyTorch's fused scaled_dot_product_attention."""
    # enable_gqa lets SDPA share each K/V head across its query group without copying it H/Hkv times.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: float, **context: Any) -> Tensor:
    """The `AttentionFn` kernels are checked against: softmax(q k^T * scale, masked) v, all in fp32.

    Slow and memory-hungry on purpose (it materialises the repeated heads and the [T, S] scores):
    every step is one line you can check by hand.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)  # [B, H, S, D]: query head h reads K/V head h // groups
    v = v.float().repeat_interleave(groups, dim=1)  # [B, H, S, D]
    scores = q.float() @ k.transpose(-2, -1) * scale  # [B, H, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, T, S] broadcasts over heads
    probs = scores.softmax(dim=-1)  # a masked slot gets exactly 0
    return (probs @ v).to(q.dtype)  # [B, H, T, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 even for bf16 activations: the mean of squares loses too much in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Rotation frequency of each pair of head dimensions, [D/2], with optional Llama-3 scaling."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq.float()
    # Llama 3.1+ stretches the low frequencies (long wavelengths) by `factor` and blends the middle band.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(is_mid, blended, out).float()


def rotate_half(x: Tensor) -> Tensor:
    # Hugging Face's convention: the two halves of the head dimension form the rotated pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, T, D]; cos, sin: [B or 1, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self.attention_fn = attention  # a plain attribute: not a parameter, not in the state dict
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.out_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                cache: KVCache | None, attention_mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        query_pos = input_pos if input_pos.dim() == 2 else input_pos.expand(B, T)  # [B, T]
        keep = attention_mask  # [B, S] or None: False for key slots to ignore
        if cache is None:
            key_pos = query_pos  # attention sees only this call's tokens
        else:
            stored = cache.update(self.layer, input_pos, k, v)
            k, v = stored[0], stored[1]  # [B, Hkv, S, D]
            key_pos = torch.arange(k.shape[2], device=x.device).expand(B, -1)  # slot j is position j
            if len(stored) == 3:  # the cache also says which slots hold something valid
                key_mask = stored[2]  # [B, S]
                if key_mask.shape != (B, k.shape[2]):
                    raise ValueError(f"cache.update returned a key mask of shape {list(key_mask.shape)}; "
                                     f"expected [batch={B}, slots={k.shape[2]}] bool")
                keep = key_mask.bool() if keep is None else keep.bool() & key_mask.bool()
        mask = causal_mask(query_pos, key_pos, keep)  # [B, 1, T, S]

        out = self.attention_fn(q, k, v, mask, scale=self.scale, layer=self.layer, cache=cache)  # [B, H, T, D]
        if out.shape != q.shape:
            raise ValueError(f"attention function {getattr(self.attention_fn, '__name__', self.attention_fn)} "
                             f"returned shape {list(out.shape)}; expected [B, H, T, D] = {list(q.shape)}")
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, attention_fn={getattr(self.attention_fn, '__name__', self.attention_fn)}"


def causal_mask(query_pos: Tensor, key_pos: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Boolean mask [B, 1, T, S]: True where a query may attend to a key.

    query_pos: [B, T]; key_pos: [B, S]; attention_mask: [B, S] with False on padding keys
    (the caller's mask and the cache's key mask, combined). A query always sees its own
    position, so a padding query never has an all-masked row
    (which would give NaN and poison the padding slot's key for later layers).
    """
    allowed = key_pos[:, None, :] <= query_pos[:, :, None]  # [B, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()
        allowed = allowed | (key_pos[:, None, :] == query_pos[:, :, None])
    return allowed[:, None]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer, attention)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos, cache, attention_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder. `forward(tokens)` returns next-token logits for every position.

    `attention` is the `AttentionFn` every layer uses (default `sdpa_attention`); change it
    later with `set_attention`, or per layer through `layers[i].self_attn.attention_fn`.
    """

    def __init__(self, args: ModelArgs, *, attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i, attention) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE angles for every position, computed once; not saved with the weights.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables on the model's device, e.g. after building it on the meta device."""
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            return
        pos = torch.arange(self.args.max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(pos, rope_inv_freq(self.args).to(device))
        angles = torch.cat((angles, angles), dim=-1)  # [max_seq_len, D]
        self.rope_cos = angles.cos()
        self.rope_sin = angles.sin()

    def set_attention(self, fn: AttentionFn) -> "Transformer":
        """Use `fn` in every layer from the next forward on; returns the model, as `.eval()` does."""
        for layer in self.layers:
            layer.self_attn.attention_fn = fn
        return self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, cache: KVCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Logits for every input position.

        tokens: [B, T] token ids.
        input_pos: positions of these tokens, [T] or [B, T]; default 0..T-1.
        cache: a `KVCache`; None means attention sees only the tokens of this call.
        attention_mask: [B, S] bool, False for key slots to ignore (padding); S is T
            without a cache, the cache's slot count with one.
        Returns logits [B, T, V] in fp32.
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.shape[-1] != T:
            raise ValueError(f"input_pos has {input_pos.shape[-1]} positions for {T} tokens")
        # Reading max(input_pos) back to Python waits for the device (a host sync that stalls a
        # GPU's queue of kernels) and is a graph break under torch.compile. So the friendly check
        # runs only where it is free: eager mode with positions on the CPU. Elsewhere an
        # out-of-range position still fails, less politely, in the RoPE table lookup below
        # (IndexError on CPU, a device-side assert on a GPU). Generation loops check lengths
        # before they start (generate.check_length), so this is a last line of defence.
        if input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
            top = int(input_pos.max())
            if top >= self.args.max_seq_len:
                raise ValueError(
                    f"position {top} is past the model's context of {self.args.max_seq_len} tokens; "
                    "shorten the prompt or generate fewer tokens"
                )
        x = self.embed_tokens(tokens)  # [B, T, C]
        cos = self.rope_cos[input_pos].to(x.dtype)  # [T, D] or [B, T, D]
        sin = self.rope_sin[input_pos].to(x.dtype)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        cos, sin = cos[:, None], sin[:, None]  # [B or 1, 1, T, D], broadcast over heads
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, cache, attention_mask)
        return self.lm_head(self.norm(x)).float()  # [B, T, V]


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> list[str]:
    """Swap `nn.Linear` layers for modules that `make` builds, in place: the hook for quantization.

    `make(name, linear)` is called once for every `nn.Linear` in `model`, with its qualified
    name ("layers.0.self_attn.q_proj", ..., "lm_head"), and returns the module to put in its
    place (same call: [..., in_features] -> [..., out_features]), or None to keep the Linear.
    Returns the names replaced, in model order. The model never learns what it now holds.

    Tied embeddings: in a tied model `lm_head.weight` *is* `embed_tokens.weight`, and the
    embedding (not a Linear) is never touched. A replacement that keeps using the Linear's
    weight (a wrapper) keeps the tie. One that builds its own storage (int8 weights, say)
    ends it: token lookup keeps the full-precision table, the head uses the new copy, and the
    model then holds the vocabulary table twice. Return None for "lm_head" to keep one table.
    """
    # Collect first, replace after, so a replacement that wraps the old Linear is not walked into
    # in this call (a later call would offer the wrapped one, as "<name>.linear" or similar).
    found = [name for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    replaced = []
    for full_name in found:
        parent_name, _, name = full_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = make(full_name, getattr(parent, name))
        if new is not None and new is not getattr(parent, name):
            setattr(parent, name, new)
            replaced.append(full_name)
    return replaced
