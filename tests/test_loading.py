"""Loading: bundled names, Hugging Face directories, and clear errors for everything else."""

from __future__ import annotations

import json

import pytest
import torch

from inferlab import ModelLoadError, load_model, load_tokenizer, save_model
from inferlab.loading import BUNDLED_DIR, BUNDLED_NAMES, args_from_hf_config

from conftest import random_model


@pytest.fixture
def model_dir(tmp_path):
    model = random_model(tie_embeddings=False)
    save_model(model, tmp_path / "m")
    return tmp_path / "m", model


def test_round_trip(model_dir):
    directory, model = model_dir
    loaded = load_model(directory)
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_unknown_name_lists_bundled_models():
    with pytest.raises(ModelLoadError) as err:
        load_model("llama-9000")
    for name in BUNDLED_NAMES:
        assert name in str(err.value)
    assert "Hugging Face-format directory" in str(err.value)


def test_unsupported_architecture_names_the_field(model_dir):
    directory, _ = model_dir
    cfg = json.loads((directory / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'architectures' is \\['MistralForCausalLM'\\]; supported: LlamaForCausalLM"):
        load_model(directory)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_config_field_is_named(model_dir, field):
    directory, _ = model_dir
    cfg = json.loads((directory / "config.json").read_text())
    del cfg[field]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=f"required field '{field}' is missing"):
        load_model(directory)


def test_missing_files_are_named(model_dir):
    directory, _ = model_dir
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weight file"):
        load_model(directory)
    (directory / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(directory)


def test_weights_that_do_not_match_config(model_dir, tmp_path):
    directory, _ = model_dir
    cfg = json.loads((directory / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing \\['layers.2"):
        load_model(directory)


def test_unsupported_features_are_named():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    args_from_hf_config(base)
    for field, value, message in [("hidden_act", "gelu", "'hidden_act' is 'gelu'"),
                                  ("mlp_bias", True, "'mlp_bias' is true"),
                                  ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "type 'yarn'")]:
        with pytest.raises(ModelLoadError, match=message):
            args_from_hf_config({**base, field: value})


def test_sharded_checkpoints_load(model_dir, tmp_path):
    """Real checkpoints come in several safetensors shards; all are read."""
    from safetensors.torch import load_file, save_file

    directory, model = model_dir
    state = load_file(directory / "model.safetensors")
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, directory / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[len(keys) // 2:]}, directory / "model-00002-of-00002.safetensors")
    (directory / "model.safetensors").unlink()
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(directory)(tokens), model(tokens))


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_bundled_models_load_and_tokenize(name):
    model, tok = load_model(name), load_tokenizer(name)
    assert model.args.vocab_size == tok.vocab_size
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    assert model.args.eos_token_id == tok.eos_id


def test_bundled_weights_fit_the_budget():
    total = sum(f.stat().st_size for f in BUNDLED_DIR.glob("*/*.safetensors"))
    assert 0 < total <= 40e6, f"bundled weights are {total / 1e6:.1f} MB; the budget is 40 MB"


def test_bundled_name_without_weights_says_how_to_train(monkeypatch, tmp_path):
    import inferlab.loading as loading

    monkeypatch.setattr(loading, "BUNDLED_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="python -m inferlab.train"):
        loading.resolve_model_dir("tiny")
