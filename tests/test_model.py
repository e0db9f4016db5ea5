"""The model's own behaviour: config validation, causality, the KV cache interface, masks, dtypes."""

from __future__ import annotations

import pytest
import torch

from inferlab import KVCache, ModelArgs, Transformer
from inferlab.model import NAMED_CONFIGS

from conftest import random_model, small_args


class GrowingCache:
    """The simplest object that satisfies `KVCache`: concatenate new keys/values per layer.

    Test scaffolding only (it assumes positions arrive in order); the kv_cache lab asks for a
    preallocated one.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer, input_pos, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        small_args(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        small_args(dim=66, n_heads=4)
    with pytest.raises(ValueError, match="dim must be positive"):
        small_args(dim=0)
    with pytest.raises(KeyError, match="known: .*tiny"):
        ModelArgs.from_name("gpt-5")


def test_named_configs_have_published_sizes():
    # Parameter counts of the real architectures, from their dimensions (embeddings included).
    counts = {name: sum(p.numel() for p in Transformer(ModelArgs.from_name(name)).parameters())
              for name in ("tiny", "tiny-draft")}
    assert 3e6 <= counts["tiny"] <= 8e6
    args = ModelArgs.from_name("llama-3-8b")
    per_layer = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * args.dim * args.ffn_dim
    total = args.n_layers * per_layer + 2 * args.vocab_size * args.dim
    assert 8.0e9 <= total <= 8.1e9  # Llama-3-8B has 8.03B parameters
    assert set(NAMED_CONFIGS) >= {"tiny", "tiny-draft", "llama-3-70b", "qwen2.5-0.5b"}


def test_causal_no_future_leak():
    model = random_model()
    tokens = torch.randint(0, 97, (1, 20))
    changed = tokens.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)


def test_growing_cache_satisfies_interface_and_matches_full_forward():
    model = random_model(n_kv_heads=1)  # GQA: 4 query heads share one key/value head
    tokens = torch.randint(0, 97, (2, 24))
    cache = GrowingCache(model.args.n_layers)
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :16], torch.arange(16), cache)]  # prefill
        for t in range(16, 24):  # then one position per step
            steps.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    assert cache.k[0].shape == (2, 1, 24, model.args.head_dim)


def test_left_padding_with_attention_mask_equals_unpadded():
    model = random_model()
    short, long_ = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 12))
    pad = 5
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long_])  # [2, 12]
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :pad] = False
    with torch.no_grad():
        batched = model(batch, attention_mask=mask)
        alone_short, alone_long = model(short), model(long_)
    assert torch.isfinite(batched).all(), "padding rows must not produce NaN"
    # RoPE depends only on relative positions, so a left-padded row gives the same logits.
    assert (batched[0, pad:] - alone_short[0]).abs().max() < 1e-4
    assert (batched[1] - alone_long[0]).abs().max() < 1e-5


def test_per_row_positions():
    model = random_model()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        shared = model(tokens)
        per_row = model(tokens, input_pos=torch.arange(10).expand(2, 10))
    assert torch.allclose(shared, per_row, atol=1e-6)


def test_position_past_context_is_rejected():
    model = random_model()
    with pytest.raises(ValueError, match="past the model's context of 64"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([64]))


def test_bf16_runs_close_to_fp32():
    model = random_model()
    tokens = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.float32  # logits always come back in fp32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_tied_and_untied_embeddings():
    tied, untied = Transformer(small_args(tie_embeddings=True)), Transformer(small_args(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters - tied.num_parameters == 97 * 64
