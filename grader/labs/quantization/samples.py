"""grader.labs.quantization.samples: sample submissions of the quantization lab, each a known kind of learner work,
with the grade a careful human grader would give. `grader.samples.build("quantization", out)` writes them as notebooks.

Each variant replaces (or, with `keep_solution`, adds to) the answer cells named in `cells` of a fully solved
notebook, or edits one with `replace`; `from_release` variants start from the learner release instead.
QZ5 builds on QZ1 and QZ2, QZ6 on QZ1 (`requires` in the spec): a careful grader gives them nothing when the
quantization they measure is wrong. `expected` is the whole grade, the timing stage's verdict on QZ6 included;
`timed` says what that verdict is where QZ6's gate (the INT8 model decodes like fp32) passes.
"""

ALL = {"QZ1": 3, "QZ2": 3, "QZ3": 2, "QZ4": 2, "QZ5": 2, "QZ6": 2}

# A correct solution written differently from the reference, every task.
DIFFERENT_QZ1 = '''
def quantize_int8(weight):
    if not torch.is_tensor(weight) or weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
    w = weight.detach().to(torch.float64)
    peak = torch.maximum(w.max(dim=1).values, -w.min(dim=1).values)  # max |w| of each row
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    codes = torch.clamp((w / scale.unsqueeze(1)).round(), min=-127, max=127)
    return codes.to(torch.int8), scale.to(torch.float32)


def dequantize_int8(q, scale):
    return torch.mul(q.to(torch.float32), scale.to(torch.float32).unsqueeze(-1))


class QuantLinear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale = quantize_int8(linear.weight.data)
        self.weight_int8 = nn.Parameter(codes, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)

    @property
    def nbytes(self):
        return sum(p.nbytes for p in self.parameters())

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.in_features % 16 == 0:
            out = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self.scale.bfloat16()).float()
        else:
            out = torch.nn.functional.linear(x2, self.weight_int8.float()) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)
'''

DIFFERENT_QZ2 = '''
GROUP_SIZES = (32, 64, 128, 256)


def quantize_int4(weight, group_size):
    if not torch.is_tensor(weight) or weight.ndim != 2 or not torch.is_floating_point(weight):
        raise ValueError("weight must be a 2-D float tensor [out_features, in_features]")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; use one of {GROUP_SIZES}")
    rows, cols = weight.shape
    if cols % group_size != 0:
        raise ValueError(f"in_features {cols} must be divisible by group_size {group_size}")
    g = weight.float().view(rows, cols // group_size, group_size)
    lo = g.min(dim=2).values
    span = g.max(dim=2).values - lo
    scales = torch.where(span == 0, torch.ones_like(span), span / 15)
    codes = ((g - lo.unsqueeze(2)) / scales.unsqueeze(2)).round().clamp(0, 15).to(torch.int32).view(rows, cols)
    pairs = codes.view(rows, cols // 2, 2)
    packed = (pairs[:, :, 0] + 16 * pairs[:, :, 1]).to(torch.uint8)
    return packed, scales, lo


def dequantize_int4(packed, scales, offsets, group_size):
    p = packed.to(torch.int32)
    codes = torch.empty(p.shape[0], 2 * p.shape[1], dtype=torch.float32)
    codes[:, 0::2] = (p % 16).float()
    codes[:, 1::2] = (p // 16).float()
    s = scales.repeat_interleave(group_size, dim=1)
    o = offsets.repeat_interleave(group_size, dim=1)
    return codes * s + o
'''

DIFFERENT_QZ3 = '''
@triton.jit
def int4_matmul_kernel(x_ptr, packed_ptr, scales_ptr, offsets_ptr, out_ptr, M, N, K,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Even and odd inputs handled as two half-width tiles: each byte is loaded once.
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = GROUP // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    groups = K // GROUP
    for g in range(groups):
        j = g * HALF + tl.arange(0, HALF)  # byte index within the row
        byte = tl.load(packed_ptr + n[None, :] * (K // 2) + j[:, None], mask=n[None, :] < N, other=0)  # [HALF, BLOCK_N]
        s = tl.load(scales_ptr + n * groups + g, mask=n < N, other=0.0)
        o = tl.load(offsets_ptr + n * groups + g, mask=n < N, other=0.0)
        w_even = (byte & 15).to(tl.float32) * s[None, :] + o[None, :]
        w_odd = (byte >> 4).to(tl.float32) * s[None, :] + o[None, :]
        x_even = tl.load(x_ptr + m[:, None] * K + 2 * j[None, :], mask=m[:, None] < M, other=0.0)
        x_odd = tl.load(x_ptr + m[:, None] * K + 2 * j[None, :] + 1, mask=m[:, None] < M, other=0.0)
        acc += tl.dot(x_even, w_even, input_precision="ieee") + tl.dot(x_odd, w_odd, input_precision="ieee")
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


def int4_matmul(x, packed, scales, offsets, group_size):
    M, N = x.shape[0], packed.shape[0]
    y = torch.zeros((M, N), dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    int4_matmul_kernel[grid](x.contiguous().float(), packed.contiguous(), scales.contiguous().float(),
                             offsets.contiguous().float(), y, M, N, x.shape[1], GROUP=group_size, BLOCK_M=32, BLOCK_N=16)
    return y
'''

DIFFERENT_QZ4 = '''
class Int8KVCache:
    def __init__(self, args, batch_size, max_seq_len):
        L, H, D = args.n_layers, args.n_kv_heads, args.head_dim
        self.codes = [torch.zeros(2, batch_size, H, max_seq_len, D, dtype=torch.int8) for _ in range(L)]
        self.scales = [torch.ones(2, batch_size, H, max_seq_len, 1) for _ in range(L)]

    def update(self, layer, input_pos, k, v):
        kv = torch.stack([k, v])  # [2, B, H, T, D]
        s = kv.abs().amax(dim=-1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        self.codes[layer][:, :, :, input_pos] = (kv / s).round().clamp(-127, 127).to(torch.int8)
        self.scales[layer][:, :, :, input_pos] = s
        n = int(input_pos.max().item()) + 1
        both = self.codes[layer][..., :n, :].to(torch.float32) * self.scales[layer][..., :n, :]
        return both[0], both[1]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.codes + self.scales)
'''

DIFFERENT_QZ5 = '''
def perplexity(model, texts):
    with torch.no_grad():
        logps = []
        for text in texts:
            ids = torch.tensor(text).unsqueeze(0)
            lp = torch.log_softmax(model(ids)[0, :-1], dim=-1)
            logps.append(lp.gather(1, ids[0, 1:, None]).squeeze(1))
        return float(torch.exp(-torch.cat(logps).double().mean()))
'''

# The nibbles the wrong way round: element 2j in the high nibble.
NIBBLES_SWAPPED = ("packed = q[:, 0::2] | (q[:, 1::2] << 4)", "packed = (q[:, 0::2] << 4) | q[:, 1::2]")
# Truncation instead of rounding: a cast to uint8 floors the (non-negative) quotients.
TRUNCATES = ("q = torch.round((groups - offsets[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)",
             "q = ((groups - offsets[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)")
# One scale for the whole tensor, repeated per row so that the shape looks per-channel.
PER_TENSOR = ("scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # [out]",
              "scale = (w.abs().amax() / 127).clamp(min=torch.finfo(torch.float32).tiny).expand(w.shape[0]).clone()")
# Launches floor(M / BLOCK_M) x floor(N / BLOCK_N) programs: right only when the shapes are multiples of the blocks.
ALIGNED_ONLY = ("grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))",
                "grid = (max(M // BLOCK_M, 1), max(N // BLOCK_N, 1))")
# INT8 storage, but the weight is dequantized to fp32 at every call: right, and slower than fp32.
DEQUANTIZE_EVERY_CALL = ('''        flat = x.reshape(-1, self.in_features)  # [M, K]
        if self.in_features % 16 == 0 and x.device.type == "cpu":''', '''        flat = x.reshape(-1, self.in_features)  # [M, K]
        if False:''')

# Attacks on the byte count. fp32 weights stored under the INT8 name, with nbytes computed as if they were INT8.
FP32_LABELLED_INT8 = '''
class QuantLinear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", linear.weight.detach().clone())  # fp32, whatever the name says
        self.register_buffer("scale", torch.ones(linear.out_features))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight_int8, self.bias)

    @property
    def nbytes(self):
        return self.out_features * self.in_features + 4 * self.out_features * (2 if self.bias is not None else 1)
'''
# Real INT8 buffers, but the fp32 Linear kept as a submodule (and used), with nbytes counting only the INT8 part.
KEEPS_FP32_COPY = '''
class QuantLinear(QuantLinear):
    def __init__(self, linear):
        super().__init__(linear)
        self.full = linear  # "for accuracy"

    def forward(self, x):
        return self.full(x)
'''

SAMPLES = {
    "reference": {"cells": {}, "expected": ALL, "timed": "passed", "flags": False},
    "stub": {"from_release": True, "cells": {},
             "expected": {"QZ1": 0, "QZ2": 0, "QZ3": 0, "QZ4": 0, "QZ5": 0, "QZ6": 0}, "flags": False},
    "different-but-correct": {
        "cells": {"qz1-solution": DIFFERENT_QZ1, "qz2-solution": DIFFERENT_QZ2, "qz3-solution": DIFFERENT_QZ3,
                  "qz4-solution": DIFFERENT_QZ4, "qz5-solution": DIFFERENT_QZ5},
        "expected": ALL, "timed": "passed", "flags": False},
    "truncating": {"replace": {"qz2-solution": TRUNCATES},
                   "expected": {**ALL, "QZ2": 0, "QZ5": 0}, "flags": False},
    "wrong-nibble-order": {"replace": {"qz2-solution": NIBBLES_SWAPPED},
                           "expected": {**ALL, "QZ2": 0, "QZ5": 0}, "flags": False},
    "per-tensor-scales": {"replace": {"qz1-solution": PER_TENSOR},
                          "expected": {**ALL, "QZ1": 0, "QZ5": 0, "QZ6": 0}, "flags": False},
    "aligned-only-kernel": {"replace": {"qz3-solution": ALIGNED_ONLY}, "expected": {**ALL, "QZ3": 0},
                            "flags": False},
    # Right everywhere; slower than fp32 when timed, so the timing stage gives QZ6 nothing.
    "slower": {"replace": {"qz1-solution": DEQUANTIZE_EVERY_CALL}, "expected": {**ALL, "QZ6": 0}, "timed": "failed",
               "flags": False},
    "fp32-labelled-int8": {"cells": {"qz1-solution": FP32_LABELLED_INT8}, "keep_solution": True,
                           "expected": {**ALL, "QZ1": 0, "QZ5": 0, "QZ6": 0}, "flags": False},
    "claims-bytes-not-held": {"cells": {"qz1-solution": KEEPS_FP32_COPY}, "keep_solution": True,
                              "expected": {**ALL, "QZ1": 0, "QZ5": 0, "QZ6": 0}, "flags": False},
}
