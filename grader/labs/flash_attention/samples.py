"""grader.labs.flash_attention.samples: sample submissions of the flash_attention lab, each with the grade a careful
human grader would give. `grader.samples.build("flash_attention", out)` writes them as notebooks.

Each variant replaces answer cells (by nbgrader grade_id) of the solved notebook, or edits them (`replace`:
old -> new, each applied to the reference cell); `from_release` starts from the learner release. The lab's
tasks are independent, so one sample carries one mistake per task where that keeps grading cheap.
"""

from __future__ import annotations

FULL = {"FA1": 4, "FA2": 4, "FA3": 2, "FA4": 1}

# FA1, correct and written differently: the outer loop over key tiles, every query row at once (the order of
# FlashAttention's first paper), the causal mask built per key tile. Memory: an [N, block_k] tile per head.
DIFFERENT_FA1 = '''
def tiled_attention(q, k, v, causal=False, block_q=64, block_k=64):
    B, H, N, D = q.shape
    q32 = q.float() / math.sqrt(D)
    row_max = torch.full((B, H, N), -math.inf)
    row_sum = torch.zeros(B, H, N)
    out = torch.zeros(B, H, N, D)
    positions = torch.arange(N)
    for j in range(0, N, block_k):
        kj, vj = k[:, :, j:j + block_k].float(), v[:, :, j:j + block_k].float()
        scores = torch.einsum("bhnd,bhkd->bhnk", q32, kj)  # [B, H, N, bk]
        if causal:
            scores = scores.masked_fill(positions[j:j + block_k][None, :] > positions[:, None], -math.inf)
        new_max = torch.maximum(row_max, scores.max(-1).values)
        safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # rows with no key yet
        weights = torch.exp(scores - safe[..., None])
        shrink = torch.exp(row_max - safe)
        row_sum = row_sum * shrink + weights.sum(-1)
        out = out * shrink[..., None] + torch.einsum("bhnk,bhkd->bhnd", weights, vj)
        row_max = new_max
    return (out / row_sum[..., None]).to(q.dtype)
'''

# FA3, correct and written differently: closed forms instead of a loop over query tiles.
DIFFERENT_FA3 = '''
def naive_bytes_moved(batch, heads, seq_len, head_dim, element_bytes):
    return 4 * batch * heads * seq_len * (seq_len + head_dim) * element_bytes

def flash_bytes_moved(batch, heads, seq_len, head_dim, block_m, block_n, causal, element_bytes):
    tiles = seq_len // block_m
    if causal:
        key_tiles = sum(-(-(i + 1) * block_m // block_n) for i in range(tiles))
    else:
        key_tiles = tiles * (seq_len // block_n)
    kv = 2 * key_tiles * block_n * head_dim * element_bytes
    return batch * heads * (2 * seq_len * head_dim * element_bytes + kv + 4 * seq_len)
'''

# FA4, correct and written differently: the softmax's Jacobian applied row by row, via D computed from P and dP.
DIFFERENT_FA4 = '''
def flash_attention_backward(q, k, v, o, L, do, causal=False):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        s = s + torch.full(s.shape[-2:], -math.inf).triu(1)
    p = (s - L.unsqueeze(-1)).exp()
    dp = torch.einsum("bhid,bhjd->bhij", do, v)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return (torch.einsum("bhij,bhjd->bhid", ds, k) * scale, torch.einsum("bhij,bhid->bhjd", ds, q) * scale,
            torch.einsum("bhij,bhid->bhjd", p, do))
'''

# FA1 "tiled" only in name: the whole [N, N] score matrix first, then the softmax in row blocks. Right output,
# the N^2 memory the task exists to remove.
MATERIALISES_FA1 = '''
def tiled_attention(q, k, v, causal=False, block_q=64, block_k=64):
    N = q.shape[2]
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, N, N]
    if causal:
        scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    out = torch.empty_like(q)
    for i in range(0, N, block_q):
        out[:, :, i:i + block_q] = (torch.softmax(scores[:, :, i:i + block_q], -1) @ v.float()).to(q.dtype)
    return out
'''

# FA1 with the whole attention done in numpy: torch sees no N x N tensor, the process's memory does.
NUMPY_FA1 = '''
import numpy as np

def tiled_attention(q, k, v, causal=False, block_q=64, block_k=64):
    qn, kn, vn = q.double().numpy(), k.double().numpy(), v.double().numpy()
    s = qn @ kn.swapaxes(-1, -2) / np.sqrt(qn.shape[-1])  # [B, H, N, N], invisible to a torch meter
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], dtype=bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return torch.from_numpy((p / p.sum(-1, keepdims=True)) @ vn).to(q.dtype)
'''

# FA1 by PyTorch's fused attention: right and small, but not the learner's tiling.
SDPA_FA1 = '''
import torch.nn.functional as F

def tiled_attention(q, k, v, causal=False, block_q=64, block_k=64):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
'''

# FA2's attention function that never calls the kernel: the model's logits are right, the kernel unused.
BYPASS_SEAM = ('    o, _ = flash_attention_forward(q, k, v, causal=True, scale=scale)\n    return o\n',
               '    return reference_attention(q, k, v, mask, scale=scale, **context)\n')

# Typical mistakes, one per task:
NO_RESCALE_FA1 = ("l = l * alpha + p.sum(-1, keepdim=True)", "l = l + p.sum(-1, keepdim=True)")
DIAGONAL_UNMASKED_FA2 = ("            keep = keep & (cols[None, :] <= rows[:, None] + shift)\n",
                         "            keep = keep  # only the tiles right of the diagonal are skipped\n")
NO_RESCALE_FA2 = ("l = l * alpha + tl.sum(p, 1)", "l = l + tl.sum(p, 1)")
CAUSAL_IGNORED_FA3 = ("last_key = (tile + 1) * block_m if causal else seq_len", "last_key = seq_len")
NO_SCALE_FA4 = ("return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv",
                "return ds @ k, ds.transpose(-1, -2) @ q, dv")

SAMPLES = {
    "reference": {"cells": {}, "expected": FULL, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"FA1": 0, "FA2": 0, "FA3": 0, "FA4": 0}, "flags": False},
    "different": {"cells": {"fa1-solution": DIFFERENT_FA1, "fa3-solution": DIFFERENT_FA3,
                            "fa4-solution": DIFFERENT_FA4}, "expected": FULL, "flags": False},
    # The running sum not rescaled (FA1), the diagonal tile left unmasked (FA2), causal tiles not skipped in
    # the byte count (FA3), the gradients without the scale (FA4): no points for any.
    "mistakes": {"cells": {}, "replace": {"fa1-solution": NO_RESCALE_FA1, "fa2-solution": DIAGONAL_UNMASKED_FA2,
                                         "fa3-solution": CAUSAL_IGNORED_FA3, "fa4-solution": NO_SCALE_FA4},
                 "expected": {"FA1": 0, "FA2": 0, "FA3": 0, "FA4": 0}, "flags": False},
    # Right outputs without the algorithm: N x N materialised (FA1), the kernel never used by the model (FA2).
    "not-tiled": {"cells": {"fa1-solution": MATERIALISES_FA1}, "replace": {"fa2-solution": BYPASS_SEAM},
                  "expected": {"FA1": 0, "FA2": 0, "FA3": 2, "FA4": 1}, "flags": False},
    # Work hidden from the torch meter (numpy), and the running sum not rescaled in the kernel.
    "hides-work": {"cells": {"fa1-solution": NUMPY_FA1}, "replace": {"fa2-solution": NO_RESCALE_FA2},
                   "expected": {"FA1": 0, "FA2": 0, "FA3": 2, "FA4": 1}, "flags": False},
    "sdpa": {"cells": {"fa1-solution": SDPA_FA1}, "expected": {"FA1": 0, "FA2": 4, "FA3": 2, "FA4": 1},
             "flags": False},
}


def edited(cell_id: str, edit: tuple[str, str]) -> str:
    """The reference answer cell with one edit (a sample's mistake), for in-process tests."""
    from grader import notebook
    from grader.catalogue import REPO_ROOT

    source = notebook.cell(notebook.read(REPO_ROOT / "solutions" / "flash_attention" / "flash_attention.ipynb"),
                           cell_id).source
    old, new = edit
    if old not in source:
        raise ValueError(f"{old!r} is not in {cell_id}")
    lines = [line for line in source.replace(old, new).splitlines() if "### " not in line]
    return "\n".join(lines) + "\n"
