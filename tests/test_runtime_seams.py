"""The seams later labs plug into without editing model.py: the attention function, the cache's
key mask, torch.compile over a static cache, and `replace_linears` (for quantization)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferlab import Transformer, reference_attention, replace_linears, sdpa_attention

from conftest import random_model, small_args

# torch.compile's import path touches torch.jit, which warns about its own deprecation: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# ---------------------------------------------------------------------- caches used as fixtures


class StaticKVCache:
    """Preallocated [L, B, Hkv, max_seq_len, D] buffers; `update` writes with index_copy_ and returns the whole
    buffer, so every decode step has the same shapes and nothing reads a tensor back to the host: what
    torch.compile needs. Test scaffolding only: the runtime ships no cache (a preallocated one is task K1 of
    the kv_cache lab). With `key_mask=True` it also returns which slots were written (the 3-tuple protocol)."""

    def __init__(self, args, batch_size: int, max_seq_len: int, key_mask: bool = False):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.written = torch.zeros(batch_size, max_seq_len, dtype=torch.bool) if key_mask else None

    def update(self, layer, input_pos, k, v):
        # input_pos: [T] (shared by all rows); k, v: [B, Hkv, T, D]
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        if self.written is None:
            return self.k[layer], self.v[layer]
        self.written.index_fill_(1, input_pos, True)
        return self.k[layer], self.v[layer], self.written


class ShuffledBlockCache:
    """Keys and values in fixed-size blocks handed out in a shuffled order (as a paged cache would), with large
    finite garbage in every slot never written. Rows may begin late: positions below `start[b]` (left padding)
    are not stored at all, so only the cache knows those slots are empty, and it says so with a key mask.

    `update` gathers a row's blocks into logical order (slot j = position j). With `placeholder=True` it skips
    the gather and returns a stride-0 stand-in instead, for an attention function that reads the blocks itself
    through its `cache` and `layer` context (`paged_reference` below)."""

    def __init__(self, args, batch_size: int, max_seq_len: int, block_size: int = 4, start=None, seed: int = 0,
                 return_mask: bool = True, placeholder: bool = False):
        assert max_seq_len % block_size == 0
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.num_row_blocks = block_size, max_seq_len // block_size
        num_blocks = batch_size * self.num_row_blocks
        pool = (args.n_layers, num_blocks, args.n_kv_heads, block_size, args.head_dim)
        self.k_pool = 100 * torch.randn(pool, generator=g)  # garbage: attending to any of it changes the logits
        self.v_pool = 100 * torch.randn(pool, generator=g)
        self.block_table = torch.randperm(num_blocks, generator=g).view(batch_size, self.num_row_blocks)  # [B, S/bs]
        self.written = torch.zeros(batch_size, max_seq_len, dtype=torch.bool)  # [B, S]
        self.start = torch.zeros(batch_size, dtype=torch.long) if start is None else torch.as_tensor(start)
        self.return_mask, self.placeholder = return_mask, placeholder

    def update(self, layer, input_pos, k, v):
        B, Hkv, T, D = k.shape
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos  # [B, T]
        rows, cols = (pos >= self.start[:, None]).nonzero(as_tuple=True)  # the live (row, token) pairs
        p = pos[rows, cols]
        block, offset = self.block_table[rows, p // self.block_size], p % self.block_size
        self.k_pool[layer][block, :, offset] = k[rows, :, cols]  # [N, Hkv, D]
        self.v_pool[layer][block, :, offset] = v[rows, :, cols]
        self.written[rows, p] = True
        if self.placeholder:
            S = self.written.shape[1]
            k_all = v_all = k.new_zeros(()).expand(B, Hkv, S, D)  # right shape, no memory, never read
        else:
            k_all, v_all = self.gather(layer)
        return (k_all, v_all, self.written.clone()) if self.return_mask else (k_all, v_all)

    def gather(self, layer):
        """Every row's blocks in logical order: [B, Hkv, S, D] each."""
        def one(pool):
            blocks = pool[layer][self.block_table]  # [B, S/bs, Hkv, bs, D]
            B, nb, Hkv, bs, D = blocks.shape
            return blocks.permute(0, 2, 1, 3, 4).reshape(B, Hkv, nb * bs, D)
        return one(self.k_pool), one(self.v_pool)


def paged_reference(q, k, v, mask, *, scale, layer, cache, **context):
    """An attention function that ignores k and v and reads the cache's blocks through its context, as a
    paged-attention kernel does (a real one would walk the block table instead of gathering)."""
    k_all, v_all = cache.gather(layer)
    return reference_attention(q, k_all, v_all, mask, scale=scale)


def legacy_sdpa(q, k, v, mask, *, scale, **context):
    """Exactly what Attention.forward called before the attention function became pluggable."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Left-padded token ids [B, max(lengths)] (pad id 0), their mask, and the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        tokens[b, T - len(row):], mask[b, T - len(row):] = row, True
    return tokens, mask, rows


# ---------------------------------------------------------------------- the attention function


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])  # GQA with one and two K/V heads, then MHA
def test_sdpa_equals_reference_function(n_kv_heads):
    g = torch.Generator().manual_seed(n_kv_heads)
    B, H, T, S, D = 2, 4, 5, 9, 16
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, n_kv_heads, S, D, generator=g), torch.randn(B, n_kv_heads, S, D, generator=g)
    mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    mask[..., 0] = True  # the model never sends a row with nothing to attend to
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        a = sdpa_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale=D ** -0.5)
        b = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale=D ** -0.5)
        assert a.shape == b.shape == (B, H, T, D) and a.dtype == b.dtype == dtype
        assert (a.float() - b.float()).abs().max() < tol


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_model_logits_same_with_default_legacy_and_reference_attention(n_kv_heads):
    """Padding masks and per-row positions [B, T] included."""
    model = random_model(seed=n_kv_heads, n_kv_heads=n_kv_heads)
    tokens, mask, _ = padded_batch(97, [7, 12, 3], seed=n_kv_heads)
    row_pos = torch.stack([torch.arange(12) + shift for shift in (0, 5, 20)])  # [B, T], rows at their own offsets
    with torch.no_grad():
        runs = {}
        for name, fn in (("default", sdpa_attention), ("legacy", legacy_sdpa), ("reference", reference_attention)):
            model.set_attention(fn)
            runs[name] = (model(tokens, attention_mask=mask), model(tokens, input_pos=row_pos))
    for default, legacy, reference in zip(runs["default"], runs["legacy"], runs["reference"]):
        assert torch.isfinite(default).all()
        assert torch.equal(default, legacy), "the default must be bit-for-bit the model before the seam"
        assert (default - reference).abs().max() < 1e-5


def test_bundled_tiny_same_with_reference_attention(tiny):
    model = copy.deepcopy(tiny)  # the session fixture is shared: never change its attention
    tokens, mask, _ = padded_batch(model.args.vocab_size, [40, 25], seed=3)
    with torch.no_grad():
        default = model(tokens, attention_mask=mask)
        legacy = model.set_attention(legacy_sdpa)(tokens, attention_mask=mask)
        reference = model.set_attention(reference_attention)(tokens, attention_mask=mask)
    assert torch.equal(default, legacy)
    assert (default - reference).abs().max() < 1e-4


def test_custom_attention_is_called_with_unrepeated_kv_and_its_output_used():
    seen = []

    def counting(q, k, v, mask, *, scale, layer, cache, **context):
        seen.append((layer, tuple(q.shape), tuple(k.shape), tuple(mask.shape), scale, cache))
        return sdpa_attention(q, k, v, mask, scale=scale)

    def zero(q, k, v, mask, *, scale, **context):
        return torch.zeros_like(q)

    args = small_args(n_heads=4, n_kv_heads=1)
    torch.manual_seed(0)
    model = Transformer(args, attention=counting).eval()
    tokens = torch.randint(0, 97, (2, 6))
    cache = StaticKVCache(args, batch_size=2, max_seq_len=16)
    with torch.no_grad():
        counted = model(tokens, torch.arange(6), cache)
        default = model.set_attention(sdpa_attention)(tokens)
        zeroed = model.set_attention(zero)(tokens)
    assert [s[0] for s in seen] == [0, 1]  # once per layer, with its index
    assert all(s[1:] == ((2, 4, 6, 16), (2, 1, 16, 16), (2, 1, 6, 16), 0.25, cache) for s in seen)
    assert (counted - default).abs().max() < 1e-4  # a 16-slot masked buffer vs 6 keys: rounding only
    assert not torch.allclose(zeroed, default, atol=1e-2)  # the function's output is what the layer uses
    assert "attention_fn=zero" in repr(model)


def test_attention_returning_wrong_shape_is_named():
    model = random_model().set_attention(lambda q, k, v, mask, **ctx: q[:, :1])
    with pytest.raises(ValueError, match=r"returned shape \[1, 1, 5, 16\]; expected \[B, H, T, D\]"):
        model(torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------- the cache's key mask


@pytest.mark.parametrize("who_masks", ["cache", "caller"])
def test_key_mask_from_cache_gives_recompute_logits(who_masks):
    """Left-padded batch, blocks in shuffled order, garbage in empty slots, per-row positions while decoding."""
    model = random_model(seed=1, n_kv_heads=2)
    lengths, new = [6, 11, 9], 4
    tokens, pad_mask, rows = padded_batch(97, lengths, seed=1)
    P, B = tokens.shape[1], len(lengths)
    steps = torch.randint(1, 97, (B, new), generator=torch.Generator().manual_seed(2))
    if who_masks == "cache":  # the cache does not store padding and reports it: no attention_mask anywhere
        cache = ShuffledBlockCache(model.args, B, 16, start=[P - n for n in lengths])
        attention_mask = None
    else:  # the cache stores everything; the caller masks padding; the cache's all-written mask is ANDed in
        cache = ShuffledBlockCache(model.args, B, 16)
        attention_mask = torch.cat([pad_mask, torch.ones(B, 16 - P, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        out = [model(tokens, torch.arange(P), cache, attention_mask)]
        for i in range(new):
            out.append(model(steps[:, i:i + 1], torch.full((B, 1), P + i), cache, attention_mask))
        batched = torch.cat(out, dim=1)  # [B, P + new, V]
        assert torch.isfinite(batched).all(), "padding queries must not produce NaN"
        for b, row in enumerate(rows):
            alone = model(torch.cat([row, steps[b]])[None])[0]  # recompute, no cache, no padding
            assert (batched[b, P - len(row):] - alone).abs().max() < 1e-4


def test_without_the_key_mask_the_garbage_is_attended():
    """The same cache returning only (k_all, v_all): nothing hides its unwritten slots, so the logits change."""
    model = random_model(seed=1)
    tokens, _, rows = padded_batch(97, [5, 12], seed=4)
    P = tokens.shape[1]
    with torch.no_grad():
        masked = model(tokens, torch.arange(P), ShuffledBlockCache(model.args, 2, 16, start=[P - 5, 0]))
        unmasked = model(tokens, torch.arange(P),
                         ShuffledBlockCache(model.args, 2, 16, start=[P - 5, 0], return_mask=False))
        alone = model(rows[0][None])[0]
    assert (masked[0, P - 5:] - alone).abs().max() < 1e-4
    assert (unmasked[0, P - 5:] - alone).abs().max() > 1e-2
    assert torch.equal(masked[1], unmasked[1])  # a row with every slot written needs no mask


def test_paged_style_attention_reads_the_cache_through_its_context():
    """A paged kernel's pairing: the cache returns a placeholder, the function reads the blocks for `layer`."""
    model = random_model(seed=2, n_kv_heads=1)
    tokens, _, _ = padded_batch(97, [6, 10], seed=5)
    P, start = tokens.shape[1], [4, 0]
    steps = torch.randint(1, 97, (2, 3), generator=torch.Generator().manual_seed(6))

    def run(cache):
        out = [model(tokens, torch.arange(P), cache)]
        out += [model(steps[:, i:i + 1], torch.tensor([P + i]), cache) for i in range(3)]
        return torch.cat(out, dim=1)

    with torch.no_grad():
        gathered = run(ShuffledBlockCache(model.args, 2, 16, start=start))
        model.set_attention(paged_reference)
        paged = run(ShuffledBlockCache(model.args, 2, 16, start=start, placeholder=True))
    assert (paged - gathered).abs().max() < 1e-5


def test_key_mask_of_the_wrong_shape_is_named():
    class BadMask(StaticKVCache):
        def update(self, layer, input_pos, k, v):
            return self.k[layer], self.v[layer], torch.ones(k.shape[0], 3, dtype=torch.bool)

    model = random_model()
    with pytest.raises(ValueError, match=r"key mask of shape \[1, 3\]; expected \[batch=1, slots=8\]"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2), BadMask(model.args, 1, 8))


# ---------------------------------------------------------------------- torch.compile on decode


def compiled_decode(model, backend: str, key_mask: bool, prompt_len: int = 24, steps: int = 5):
    """Prefill two static caches eagerly, then decode `steps` positions eagerly and through one compiled graph.
    Returns (max |logit difference|, number of graphs compiled, seconds of the first compiled call)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)  # fullgraph: a break fails
    tokens = torch.randint(1, model.args.vocab_size, (2, prompt_len + steps), generator=torch.Generator().manual_seed(0))
    eager_cache, compiled_cache = (StaticKVCache(model.args, 2, 64, key_mask=key_mask) for _ in range(2))
    worst, first_call_s = 0.0, 0.0
    with torch.no_grad():
        for cache in (eager_cache, compiled_cache):
            model(tokens[:, :prompt_len], torch.arange(prompt_len), cache)
        for t in range(prompt_len, prompt_len + steps):
            pos = torch.tensor([t])  # a tensor, so a new position is new data, not a new graph
            start = time.perf_counter()
            got = compiled(tokens[:, t:t + 1], pos, compiled_cache)
            first_call_s = first_call_s or time.perf_counter() - start
            want = model(tokens[:, t:t + 1], pos, eager_cache)
            worst = max(worst, (got - want).abs().max().item())
    torch._dynamo.reset()
    return worst, counter.frame_count, first_call_s


@pytest.mark.parametrize("key_mask", [False, True], ids=["2-tuple", "3-tuple"])
def test_compiled_decode_is_one_graph_and_matches_eager(tiny, key_mask):
    worst, graphs, _ = compiled_decode(tiny, "aot_eager", key_mask)
    assert graphs == 1, f"{graphs} graphs for 5 decode positions: something recompiles per position"
    assert worst < 1e-4


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager(tiny):
    """The default backend, generated C++ included (30 s to compile on 2 CPU cores, cold cache)."""
    worst, graphs, _ = compiled_decode(tiny, "inductor", key_mask=False)
    assert graphs == 1 and worst < 1e-4


# ---------------------------------------------------------------------- replace_linears


class FakeQuantLinear(nn.Module):
    """Wraps a Linear and rounds its weight to `bits`-bit integers per output row at every call (fake
    quantization). It keeps using the Linear's own weight, so a tied head stays tied."""

    def __init__(self, linear: nn.Linear, bits: int = 8):
        super().__init__()
        self.linear, self.levels = linear, 2 ** (bits - 1) - 1

    def forward(self, x):
        w = self.linear.weight
        step = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / self.levels  # [out, 1]
        return F.linear(x, (w / step).round() * step, self.linear.bias)


class Int8Linear(nn.Module):
    """Owns int8 weights and per-row scales; no reference to the Linear it came from."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127  # [out, 1]
        self.register_buffer("weight_int8", (w / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight_int8.to(x.dtype) * self.scale, self.bias)


def test_replace_linears_names_every_linear_and_a_wrapper_keeps_the_tie(tiny):
    model = copy.deepcopy(tiny)
    tokens = torch.randint(0, model.args.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        names = replace_linears(model, lambda name, linear: FakeQuantLinear(linear, bits=8))
        after = model(tokens)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"layers.{i}.{n}" for i in range(model.args.n_layers) for n in per_layer] + ["lm_head"]
    assert not any(isinstance(m, nn.Linear) and not isinstance(p, FakeQuantLinear)
                   for p in model.modules() for m in p.children())
    assert model.lm_head.linear.weight is model.embed_tokens.weight  # the wrapper reads the shared table
    diff = (after - before).abs().max().item()
    assert 0 < diff < 0.1 * before.abs().max().item()  # rounded weights: changed, but only a little
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9
    offered = []  # a second pass sees the Linears inside the wrappers, under the wrappers' names
    assert replace_linears(model, lambda name, linear: offered.append(name)) == []
    assert offered == [f"{name}.linear" for name in names]


def test_replace_linears_none_keeps_the_layer_and_exact_wrappers_change_nothing():
    model = random_model()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        before = model(tokens)
        names = replace_linears(model, lambda name, linear: FakeQuantLinear(linear, 4) if "mlp" in name else None)
        quantized = model(tokens)
    assert names == [f"layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")]
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed_tokens.weight  # None for "lm_head" keeps one shared table
    assert not torch.allclose(before, quantized, atol=1e-4)

    class Exact(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)

    model = random_model()
    replace_linears(model, lambda name, linear: Exact(linear))
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def test_replacing_a_tied_head_with_own_storage_keeps_the_embedding():
    model = random_model(tie_embeddings=True)
    embed = model.embed_tokens.weight
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        before = model(tokens)
        assert replace_linears(model, lambda name, linear: Int8Linear(linear) if name == "lm_head" else None) \
            == ["lm_head"]
        after = model(tokens)
    assert model.embed_tokens.weight is embed and embed.dtype == torch.float32  # lookup keeps the fp32 table
    state = model.state_dict()
    assert {"embed_tokens.weight", "lm_head.weight_int8"} <= set(state) and "lm_head.weight" not in state
    assert (after - before).abs().max() < 0.02 * before.abs().max()  # the table is now held twice
