"""inferlab: the runtime the course's labs build on.

    from inferlab import load_model, load_tokenizer, naive_generate
    model, tok = load_model("tiny"), load_tokenizer("tiny")
    print(tok.decode(naive_generate(model, tok.encode("def fib(n):"), max_new_tokens=32)))

Modules, in the order the data flows: `model` (the Llama architecture and the seams the
labs plug into: the cache interface, the attention function, `replace_linears`),
`tokenizer`, `loading`, `generate` (sampling and the naive baseline), `workloads`
(prompts and request traces), `bench` (timing and bandwidth), `train` (how the bundled
models were made).
"""

from .generate import naive_generate, naive_generate_stream, sample
from .loading import BUNDLED_NAMES, ModelLoadError, load_model, load_tokenizer, save_model
from .model import (AttentionFn, KVCache, ModelArgs, Transformer, reference_attention, replace_linears,
                    sdpa_attention)

__all__ = [
    "AttentionFn", "BUNDLED_NAMES", "KVCache", "ModelArgs", "ModelLoadError", "Transformer",
    "load_model", "load_tokenizer", "naive_generate", "naive_generate_stream", "reference_attention",
    "replace_linears", "sample", "save_model", "sdpa_attention",
]
__version__ = "0.1.0"
