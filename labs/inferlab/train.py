"""inferlab.train: train the course's bundled models, `tiny` and `tiny-draft`, from scratch.

    python -m inferlab.train                 # tokenizer, target, draft, model cards
    python -m inferlab.train --only tiny     # one model (the tokenizer is reused if present)

No data is downloaded: the corpus is the Python standard library's own source files on
this machine (`sysconfig`'s stdlib directory), split by file into train and held-out sets.
Nothing of the corpus is committed; the models, the tokenizer and the model cards are.

Training is deterministic for a given corpus and seed, checkpoints to `--work` every
`--checkpoint-every` steps, and resumes from the last checkpoint when restarted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .generate import naive_generate
from .loading import BUNDLED_DIR, load_model, save_model
from .model import ModelArgs, Transformer

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
HELD_OUT_EVERY = 50  # one file in 50 (by hash of its path) is held out


# ---------------------------------------------------------------------------- corpus

def stdlib_files(keep=lambda rel_path: True) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's Python source files that `keep` accepts, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not keep(rel):
            continue
        try:
            files.append((rel, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test fixtures are deliberately not UTF-8
    if not files:
        raise RuntimeError(f"no Python source files found under {root}")
    return files


def is_held_out(rel_path: str) -> bool:
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split_corpus() -> tuple[list[str], list[str]]:
    train, held_out = [], []
    for rel, text in stdlib_files():
        (held_out if is_held_out(rel) else train).append(text)
    return train, held_out


def held_out_files() -> list[tuple[str, str]]:
    """The held-out files, (path, text): text that no bundled model was trained on."""
    return stdlib_files(keep=is_held_out)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[2],
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}, indent=2) + "\n")


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """One token stream: <bos> file <eos> <bos> file <eos> ..."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    ids: list[int] = []
    for enc in tokenizer._tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


# ---------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 1234
    bf16_autocast: bool = True  # mixed precision: fp32 weights, bf16 matmuls (1.8x faster on AVX512-BF16 CPUs)
    checkpoint_every: int = 100


# Steps chosen so both models finish within 80 minutes on 2 CPU cores (78 measured: see the model cards).
TRAIN_CONFIGS = {"tiny": TrainConfig(steps=1200), "tiny-draft": TrainConfig(steps=1500, lr=5e-3)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(stream: np.ndarray, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step) so a resumed run sees the same batches."""
    gen = np.random.default_rng([cfg.seed, step])
    starts = gen.integers(0, len(stream) - cfg.seq_len - 1, size=cfg.batch_size)
    windows = np.stack([stream[s:s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]  # inputs, next-token targets: [B, seq_len] each


def train_model(name: str, args: ModelArgs, cfg: TrainConfig, stream: np.ndarray, work: Path,
                log=print, stop_at: int | None = None) -> tuple[Transformer, dict]:
    """Train (or resume training) one model; `stop_at` pauses after that step with a checkpoint."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    model.apply(_init_weights)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed_s"]
        log(f"[{name}] resumed at step {step} ({elapsed / 60:.1f} min so far)")

    model.train()
    t0 = time.perf_counter() - elapsed
    losses = []
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < last:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = batch_at(stream, step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = model(x)  # [B, T, V], fp32 (the model casts its output)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            log(f"[{name}] step {step}/{cfg.steps} loss {np.mean(losses[-25:]):.3f} "
                f"lr {lr_at(step - 1, cfg):.2e} {elapsed / 60:.1f} min")
            with open(work / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": float(np.mean(losses[-25:])), "elapsed_s": elapsed}) + "\n")
        if step % cfg.checkpoint_every == 0 or step == last:
            elapsed = time.perf_counter() - t0
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "elapsed_s": elapsed}, tmp)
            os.replace(tmp, ckpt_path)  # atomic: a kill mid-write leaves the previous checkpoint
    model.eval()
    stats = {"steps": cfg.steps, "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
             "train_seconds": round(time.perf_counter() - t0, 1), "batch_size": cfg.batch_size,
             "seq_len": cfg.seq_len, "peak_lr": cfg.lr, "seed": cfg.seed,
             "precision": "bf16 autocast, fp32 weights" if cfg.bf16_autocast else "fp32"}
    return model, stats


def _init_weights(module: torch.nn.Module) -> None:
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------- evaluation

def held_out_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    n = min(max_windows, (len(stream) - 1) // seq_len)
    return torch.from_numpy(stream[: n * seq_len + 1].astype(np.int64))  # [n*seq_len + 1]


@torch.no_grad()
def perplexity(model: Transformer, stream: np.ndarray, seq_len: int = 512, max_windows: int = 64) -> float:
    data = held_out_windows(stream, seq_len, max_windows)
    n = (len(data) - 1) // seq_len
    x, y = data[:-1].view(n, seq_len), data[1:].view(n, seq_len)
    nll = sum(F.cross_entropy(model(x[i:i + 8]).flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
              for i in range(0, n, 8))
    return math.exp(nll / y.numel())


def unigram_perplexity(train_stream: np.ndarray, held_out_stream: np.ndarray, vocab_size: int) -> float:
    """Perplexity of predicting every token from training-set token frequencies (add-one smoothed)."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[held_out_stream[1:]].mean()))


@torch.no_grad()
def greedy_agreement(target: Transformer, draft: Transformer, stream: np.ndarray, seq_len: int = 512,
                     max_windows: int = 64) -> float:
    """Fraction of held-out positions where the draft's argmax equals the target's."""
    data = held_out_windows(stream, seq_len, max_windows)
    n = (len(data) - 1) // seq_len
    x = data[:-1].view(n, seq_len)
    same = total = 0
    for i in range(0, n, 8):
        same += (target(x[i:i + 8]).argmax(-1) == draft(x[i:i + 8]).argmax(-1)).sum().item()
        total += x[i:i + 8].numel()
    return same / total


def flops_per_token(args: ModelArgs, context: int) -> int:
    """Multiply-adds x2 for one decoded token at a given context: matmuls with weights, plus attention."""
    attn_proj = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + args.n_heads * args.head_dim * args.dim
    mlp = 3 * args.dim * args.ffn_dim
    attention = 2 * args.n_heads * args.head_dim * context  # q.k scores and the weighted sum of v
    return 2 * (args.n_layers * (attn_proj + mlp + attention) + args.dim * args.vocab_size)


@torch.no_grad()
def forward_seconds(model: Transformer, repeats: int = 10) -> float:
    """Per-token forward time, median over repeats of a 128-token forward (amortises Python overhead)."""
    x = torch.randint(0, model.args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / x.shape[1]


# ---------------------------------------------------------------------------- model cards

def write_model_card(directory: Path, name: str, model: Transformer, stats: dict) -> None:
    a = model.args
    lines = [
        f"# {name}",
        "",
        ("The course's target model: the model the labs make fast." if name == "tiny" else
         "The course's draft model: a much cheaper model with the same tokenizer, for speculative sampling."),
        "Trained from scratch by `python -m inferlab.train` on the Python standard library's own source",
        "files; Llama architecture, Hugging Face format (`transformers` loads this directory as is).",
        "",
        "## Config",
        "",
        "| field | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in (
            ("architecture", "LlamaForCausalLM"), ("parameters", f"{model.num_parameters:,}"),
            ("dim", a.dim), ("layers", a.n_layers), ("query heads", a.n_heads), ("key/value heads", a.n_kv_heads),
            ("head dim", a.head_dim), ("MLP width (SwiGLU)", a.ffn_dim), ("vocab (byte-level BPE)", a.vocab_size),
            ("context", a.max_seq_len), ("rope_theta", a.rope_theta), ("tied embeddings", a.tie_embeddings))],
        "",
        "## Training",
        "",
        "| measure | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in (
            ("corpus", f"Python {stats['python_version']} stdlib sources: {stats['train_files']} train files, "
                       f"{stats['held_out_files']} held-out files (1 in {HELD_OUT_EVERY} by path hash)"),
            ("corpus tokens (train / held-out)", f"{stats['train_tokens']:,} / {stats['held_out_tokens']:,}"),
            ("steps x batch x sequence", f"{stats['steps']} x {stats['batch_size']} x {stats['seq_len']}"),
            ("tokens seen", f"{stats['tokens_seen']:,}"),
            ("optimiser", f"AdamW, peak lr {stats['peak_lr']}, cosine to 10%, seed {stats['seed']}"),
            ("precision", stats["precision"]),
            ("training time", f"{stats['train_seconds'] / 60:.1f} min on {stats['machine']}"))],
        "",
        "## Measured",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| held-out perplexity (per token, 512-token windows) | {stats['held_out_perplexity']:.2f} |",
        f"| unigram baseline perplexity (same held-out tokens) | {stats['unigram_perplexity']:.2f} |",
        f"| FLOPs per token at 128 context | {stats['flops_per_token']:,} |",
        f"| forward time per token (128-token forward, median of 10) | {stats['forward_ms']:.2f} ms |",
    ]
    if "greedy_agreement" in stats:
        lines += [
            f"| greedy next-token agreement with `tiny` (held-out) | {stats['greedy_agreement']:.3f} |",
            f"| per-token cost relative to `tiny`, FLOPs at 128 context | {stats['flops_ratio']:.3f} |",
            f"| per-token cost relative to `tiny`, measured forward time | {stats['time_ratio']:.3f} |",
        ]
    lines += ["", "## Sample (greedy, prompt `def fib(n):`)", "", "```python", stats["sample"], "```", ""]
    (directory / "README.md").write_text("\n".join(lines))
    (directory / "training.json").write_text(json.dumps(stats, indent=2) + "\n")


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferlab.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR, help="where model folders go (default: bundled)")
    parser.add_argument("--work", type=Path, default=Path(".train-work"), help="checkpoints and logs")
    parser.add_argument("--only", choices=["tiny", "tiny-draft"], help="train one model only")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--fp32", action="store_true", help="train in plain fp32 (slower; for CPUs without bf16)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    from .tokenizer import Tokenizer

    train_texts, held_texts = split_corpus()
    tok_dir = opts.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        print(f"training tokenizer on {len(train_texts)} files")
        train_tokenizer(train_texts, ModelArgs.from_name("tiny").vocab_size, tok_dir)
    tokenizer = Tokenizer.from_dir(tok_dir)
    train_stream, held_stream = encode_stream(tokenizer, train_texts), encode_stream(tokenizer, held_texts)
    print(f"corpus: {len(train_stream):,} train tokens, {len(held_stream):,} held-out tokens")
    unigram = unigram_perplexity(train_stream, held_stream, tokenizer.vocab_size)
    common = {"python_version": platform.python_version(), "train_files": len(train_texts),
              "held_out_files": len(held_texts), "train_tokens": len(train_stream),
              "held_out_tokens": len(held_stream), "unigram_perplexity": unigram,
              "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"}

    names = [opts.only] if opts.only else ["tiny", "tiny-draft"]
    for name in names:
        args = ModelArgs.from_name(name)
        args.bos_token_id, args.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        cfg = TRAIN_CONFIGS[name]
        cfg = TrainConfig(**{**cfg.__dict__, "steps": max(1, int(cfg.steps * opts.steps_scale)),
                             "bf16_autocast": not opts.fp32})
        model, stats = train_model(name, args, cfg, train_stream, opts.work / name)
        out_dir = opts.out / name
        save_model(model, out_dir)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / file).write_bytes((tok_dir / file).read_bytes())
        stats.update(common)
        stats["parameters"] = model.num_parameters
        stats["held_out_perplexity"] = perplexity(model, held_stream)
        stats["forward_ms"] = forward_seconds(model) * 1e3
        stats["flops_per_token"] = flops_per_token(model.args, 128)
        if name == "tiny-draft" and (opts.out / "tiny" / "config.json").exists():
            target = load_model(opts.out / "tiny")
            stats["greedy_agreement"] = greedy_agreement(target, model, held_stream)
            stats["time_ratio"] = stats["forward_ms"] / (forward_seconds(target) * 1e3)
            stats["flops_ratio"] = flops_per_token(model.args, 128) / flops_per_token(target.args, 128)
        prompt = tokenizer.encode("def fib(n):")
        stats["sample"] = "def fib(n):" + tokenizer.decode(
            naive_generate(model, prompt, max_new_tokens=64, temperature=0.0, eos_id=tokenizer.eos_id))
        write_model_card(out_dir, name, model, stats)
        print(f"[{name}] wrote {out_dir}: held-out perplexity {stats['held_out_perplexity']:.2f} "
              f"(unigram {unigram:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
