"""inferlab.loading: load a bundled model by name, or a Hugging Face-format directory.

A model directory holds `config.json` (a `LlamaForCausalLM` or `Qwen2ForCausalLM`
config), one or more `*.safetensors` files and `tokenizer.json`. The bundled models in
`inferlab/models/<name>/` use exactly that format, so Hugging Face `transformers` can load
them too (the benchmarks rely on it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_NAMES = ("tiny", "tiny-draft")
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class ModelLoadError(ValueError):
    """A model name or directory that cannot be loaded; the message says what to fix."""


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """The directory of a bundled model name or of a user's checkpoint."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in BUNDLED_NAMES:
        directory = BUNDLED_DIR / name
        if not (directory / "config.json").is_file():
            raise ModelLoadError(
                f"bundled model {name!r} has no weights in {directory}; train them with `python -m inferlab.train`"
            )
        return directory
    raise ModelLoadError(
        f"unknown model {name!r}: bundled models are {', '.join(BUNDLED_NAMES)}; "
        "or give the path of a Hugging Face-format directory (config.json, *.safetensors, tokenizer.json)"
    )


def args_from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """Translate a Hugging Face Llama/Qwen2 config dict into `ModelArgs`, rejecting what we cannot run."""
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"{source}: field 'architectures' is {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str):
        if key not in cfg:
            raise ModelLoadError(f"{source}: required field {key!r} is missing")
        return cfg[key]

    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: field 'hidden_act' is {cfg['hidden_act']!r}; only 'silu' is supported")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{source}: field 'mlp_bias' is true; MLP biases are not supported")
    if cfg.get("use_sliding_window"):
        raise ModelLoadError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not supported")

    # Newer transformers versions nest RoPE settings under "rope_parameters".
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ModelLoadError(f"{source}: field 'rope_scaling' has type {kind!r}; supported: 'llama3' or none")
        else:
            scaling = {k: scaling[k] for k in
                       ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

    eos = cfg.get("eos_token_id")
    n_heads = need("num_attention_heads")
    return ModelArgs(
        vocab_size=need("vocab_size"),
        dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=need("intermediate_size"),
        head_dim=cfg.get("head_dim") or 0,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        out_bias=False if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", arch == "qwen2")),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        arch=arch,
    )


def hf_config_from_args(args: ModelArgs) -> dict[str, Any]:
    """The `config.json` that Hugging Face `transformers` (and `load_model`) read back."""
    if args.arch == "qwen2" and (not args.qkv_bias or args.out_bias):
        raise ValueError("a qwen2 config always has q/k/v biases and no o_proj bias")
    if args.arch == "llama" and args.qkv_bias != args.out_bias:
        raise ValueError("a llama config has biases on all four attention projections or on none")
    cfg = {
        "architectures": ["LlamaForCausalLM" if args.arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": args.arch,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.ffn_dim,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "torch_dtype": "float32",
    }
    if args.arch == "llama":
        cfg["attention_bias"] = args.qkv_bias
        cfg["mlp_bias"] = False
    else:
        cfg["use_sliding_window"] = False
    return cfg


def read_config(directory: Path) -> ModelArgs:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: a model directory needs a Hugging Face config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from None
    return args_from_hf_config(cfg, source=str(path))


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of all `*.safetensors` files in the directory, with Hugging Face's `model.` prefix removed."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weight file")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                state[key.removeprefix("model.")] = f.get_tensor(key)
    return state


def load_model(name_or_path: str | Path = "tiny", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """A ready-to-run model in eval mode: a bundled name (`tiny`, `tiny-draft`) or a checkpoint directory."""
    directory = resolve_model_dir(name_or_path)
    args = read_config(directory)
    state = read_state_dict(directory)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy anyway
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k for k in model.state_dict() if not (args.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {directory} do not match config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    # Adopt the checkpoint's tensors instead of initialising random ones first (matters for 8B models).
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope()
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(name_or_path: str | Path = "tiny") -> Tokenizer:
    return Tokenizer.from_dir(resolve_model_dir(name_or_path))


def save_model(model: Transformer, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` in Hugging Face's layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v.detach().float().contiguous().cpu()
             for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_from_args(model.args), indent=2) + "\n")
    return directory
