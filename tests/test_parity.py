"""Our model equals Hugging Face transformers on the same weights (fp32, max |logit diff| <= 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from inferlab import load_model, save_model

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[dev]')")

TOLERANCE = 1e-4

CASES = {
    "llama-mha-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-gqa-bias-llama3-rope": ("llama", dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
        rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "qwen2-mha-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2-gqa-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                     rope_theta=1000000.0)),
}


def hf_model(arch: str, extra: dict):
    common = dict(vocab_size=151, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  max_position_embeddings=128, rms_norm_eps=1e-6)
    common.update(extra)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: randomise so every weight matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    arch, extra = CASES[case]
    reference = hf_model(arch, extra)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path)
    tokens = torch.randint(0, 151, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = ours(tokens)
    diff = (expected - got).abs().max().item()
    assert diff <= TOLERANCE, f"{case}: max |logit diff| {diff:.2e} > {TOLERANCE}"
    assert ours.args.n_kv_heads == extra["num_key_value_heads"]
    assert ours.args.tie_embeddings == extra["tie_word_embeddings"]


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-gqa-tied"])
def test_saved_model_loads_in_transformers(case, tmp_path):
    """save_model writes a directory that transformers reads back to the same logits (the bench relies on it)."""
    arch, extra = CASES[case]
    reference = hf_model(arch, extra)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [f"{'Llama' if arch == 'llama' else 'Qwen2'}ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 151, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (back(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= TOLERANCE


def test_bundled_tiny_matches_transformers(tiny):
    from inferlab.loading import resolve_model_dir

    reference = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny")).eval()
    tokens = torch.randint(0, tiny.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (reference(tokens).logits - tiny(tokens)).abs().max().item()
    assert diff <= TOLERANCE
