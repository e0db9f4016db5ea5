"""inferlab.tokenizer: a thin wrapper over a Hugging Face `tokenizer.json`.

The bundled models use a byte-level BPE tokenizer trained by `inferlab.train`; real
Llama and Qwen2 checkpoints bring their own `tokenizer.json`. Either way the labs see the
same four things: `encode`, `decode`, `bos_id`, `eos_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, hf_tokenizer: _HFTokenizer, bos_id: int | None, eos_id: int | None,
                 source: str | None = None):
        self._tok = hf_tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.source = source  # the tokenizer.json it was read from, if any: two reads of one file encode alike

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with the BOS token first when the tokenizer has one and `bos` is set."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @classmethod
    def from_dir(cls, directory: Path) -> "Tokenizer":
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a model directory needs a Hugging Face tokenizer.json")
        tok = _HFTokenizer.from_file(str(path))
        bos_id, eos_id = _special_ids(directory, tok)
        return cls(tok, bos_id, eos_id, source=str(path.resolve()))


def _special_ids(directory: Path, tok: _HFTokenizer) -> tuple[int | None, int | None]:
    """BOS/EOS ids: tokenizer_config.json names the tokens; config.json may give the ids."""
    bos = eos = None
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        bos, eos = (_token_id(tok, cfg.get(key)) for key in ("bos_token", "eos_token"))
    model_cfg_path = directory / "config.json"
    if (bos is None or eos is None) and model_cfg_path.is_file():
        model_cfg = json.loads(model_cfg_path.read_text())
        eos_cfg = model_cfg.get("eos_token_id")
        bos = bos if bos is not None else model_cfg.get("bos_token_id")
        eos = eos if eos is not None else (eos_cfg[0] if isinstance(eos_cfg, list) else eos_cfg)
    return bos, eos


def _token_id(tok: _HFTokenizer, token) -> int | None:
    if isinstance(token, dict):  # older configs store AddedToken objects
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None
