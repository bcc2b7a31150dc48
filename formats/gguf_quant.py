"""llama.cpp's quantised block formats, written: float32 weights → the bytes of a GGUF tensor.

The readers are in gguf_file.py (`dequantize_*`, whose docstrings give each block's layout); each
quantiser here is the inverse of one of them, ported from ggml's reference code
(`quantize_row_*_ref` in ggml-quants.c, which is also what `llama-quantize` runs when it is given
no importance matrix). Every function takes all blocks of a tensor at once, (n_blocks, block_size)
float32, and returns (n_blocks, block_bytes) uint8.

Two roundings appear, as in ggml: `roundf` (half away from zero: Q8_0) and `nearest_int`
(half to even: the k-quants). Casting a positive float to an int, as ggml does in Q4_0/Q4_1/Q5_0,
truncates, hence their "+ 0.5".
"""
import torch

from formats.gguf_file import GGML_TYPES

TYPE_IDS = {kind.name: type_id for type_id, kind in GGML_TYPES.items()}  # "Q4_K" -> 12
# weights quantised at a time: the k-quant searches make ~20 candidates per block, and an export
# holds no float32 copy of a whole tensor (Llama-3's embedding: 2.1 GB), only of this many
WEIGHTS_AT_ONCE = 2**22


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n,) or (n, 1) float32 → (n, 2) bytes of IEEE half (rounded to nearest even)."""
    return values.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (an all-zero block)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 2k) 4-bit codes → (n, k) bytes: codes 0..k-1 in the low nibbles, k..2k-1 in the high
    (gguf_file._nibbles reads them back)."""
    low, high = q.to(torch.uint8).chunk(2, dim=1)
    return low | (high << 4)


def _max_by_magnitude(x: torch.Tensor) -> torch.Tensor:
    """The signed value of largest |x| in each row (the first one on a tie), (n, 1)."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True))


# ---------------------------------------------------------------- plain floats

def quantize_f32(x):
    return x.contiguous().view(torch.uint8).reshape(-1, 4)


def quantize_f16(x):
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def quantize_bf16(x):
    return x.to(torch.bfloat16).view(torch.uint8).reshape(-1, 2)


# ---------------------------------------------------------------- blocks of 32

def quantize_q8_0(x):
    """Q8_0: d = max|x| / 127, q = roundf(x / d) in -127..127."""
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=1)


def quantize_q4_0(x):
    """Q4_0: d = m / -8 for the m of largest magnitude (so m itself gets code 0), q = x/d + 8
    truncated to 0..15."""
    d = _max_by_magnitude(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(max=15)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)


def quantize_q4_1(x):
    """Q4_1: m = min x, d = (max x − m) / 15, q = (x − m)/d rounded to 0..15."""
    low = x.amin(dim=1, keepdim=True)
    d = (x.amax(dim=1, keepdim=True) - low) / 15
    q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(max=15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), _pack_nibbles(q)], dim=1)


def quantize_q5_0(x):
    """Q5_0: as Q4_0 with 5 bits, d = m / -16, q in 0..31; the 5th bits go into a uint32."""
    d = _max_by_magnitude(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(max=31).to(torch.uint8)
    fifth_bits = (q >> 4).reshape(-1, 4, 8).to(torch.int32)  # bit i of the uint32 is weight i
    qh = (fifth_bits << torch.arange(8, dtype=torch.int32)).sum(dim=2).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), qh, _pack_nibbles(q & 0x0F)], dim=1)


# ---------------------------------------------------------------- k-quants: 256 per block

def _fit_scale_and_min(x, weights, n_max=15, r_min=-1.0, r_delta=0.1, n_steps=20):
    """ggml's make_qkx2_quants for each row of x: a scale s and an offset m ≤ 0 that make
    Σ w·(s·q + m − x)² small, with integer codes q in 0..n_max. Start from the codes that span
    [m, max] exactly (m = min(x, 0)); then, n_steps + 1 times, code x over a slightly different
    span, fit s and m to those codes by weighted least squares, and keep the fit if its error is
    lower. As in ggml, each try spans from the offset kept so far, so the tries run in order.
    Returns (s, −m, q) with shapes (n,), (n,), (n, 32)."""
    offset = x.amin(dim=1, keepdim=True).clamp(max=0)
    high = x.amax(dim=1, keepdim=True)
    flat = high == offset

    def codes(span_steps):  # (n, 1) → (n, 32): x coded over [offset, high] in span_steps steps
        span = torch.where(flat, 1, high - offset)
        return torch.round(span_steps / span * (x - offset)).clamp(0, n_max)

    def error(scale, offset, q):
        return (weights * (scale * q + offset - x) ** 2).sum(dim=1, keepdim=True)

    scale = torch.where(flat, 1, high - offset) / n_max
    q = codes(torch.full_like(high, n_max))
    best = error(scale, offset, q)
    sum_w = weights.sum(dim=1, keepdim=True)
    sum_x = (weights * x).sum(dim=1, keepdim=True)
    step = torch.tensor(r_delta, dtype=torch.float32)  # ggml's float arithmetic: 0.1f·is
    for i in range(n_steps + 1):
        tried = codes(r_min + step * i + n_max + torch.zeros_like(high))
        sum_l = (weights * tried).sum(dim=1, keepdim=True)
        sum_l2 = (weights * tried * tried).sum(dim=1, keepdim=True)
        sum_xl = (weights * tried * x).sum(dim=1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, 1)
        fit_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        fit_offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        # the offset must not be positive: then refit the scale alone
        fit_scale = torch.where(fit_offset > 0, sum_xl / sum_l2.clamp(min=1e-30), fit_scale)
        fit_offset = fit_offset.clamp(max=0)
        err = error(fit_scale, fit_offset, tried)
        better = (det > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        scale = torch.where(better, fit_scale, scale)
        offset = torch.where(better, fit_offset, offset)
        q = torch.where(better, tried, q)
    scale = torch.where(flat, 0, scale)
    q = torch.where(flat, 0, q)
    return scale[:, 0], -offset[:, 0], q


def _six_bits(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """Each value as a 6-bit multiple of largest/63 (as a uint8 cast, then capped at 63)."""
    inverse = torch.where(largest > 0, 63 / largest, torch.zeros_like(largest))
    return torch.round(inverse[:, None] * values).remainder(256).clamp(max=63).to(torch.uint8)


def quantize_q4_k(x):
    """Q4_K (layout: gguf_file.dequantize_q4_k). Each sub-block of 32 gets a scale and a min
    fitted by _fit_scale_and_min, weighting each weight by rms(sub-block) + |x|. The 8 scales
    and 8 mins are then stored as 6-bit multiples of d = max scale / 63 and dmin = max min / 63,
    and every weight is re-coded against the stored values: q = round((x + dmin·m_s)/(d·s_s))."""
    n = len(x)
    sub = x.reshape(n * 8, 32)
    weights = sub.pow(2).mean(dim=1, keepdim=True).sqrt() + sub.abs()
    scales, mins, q = _fit_scale_and_min(sub, weights)
    scales, mins, q = scales.reshape(n, 8), mins.reshape(n, 8), q.reshape(n, 8, 32)
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    ls, lm = _six_bits(scales, max_scale), _six_bits(mins, max_min)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)
    step = d.float()[:, None] * ls.float()
    shift = dmin.float()[:, None] * lm.float()
    safe_step = torch.where(step == 0, 1, step)
    recoded = torch.round((sub.reshape(n, 8, 32) + shift[:, :, None]) / safe_step[:, :, None])
    recoded = recoded.clamp(0, 15)
    q = torch.where((step != 0)[:, :, None], recoded, q).to(torch.uint8)
    # bytes 0..3: scales 0..3 + top bits of scales 4..7; 4..7: the same for the mins;
    # 8..11: low 4 bits of scales 4..7 | low 4 bits of mins 4..7 << 4
    packed_scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                               lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                               (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], dim=1)
    pairs = q.reshape(n, 4, 2, 32)  # chunk c: sub-block 2c in the low nibbles, 2c+1 in the high
    codes = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), packed_scales, codes], dim=1)


def _fit_symmetric_scale(x, n_max=32):
    """ggml's make_qx_quants (rmse_type 1) for each row of x: codes q in −n_max..n_max−1 for the
    span set by the value of largest magnitude, and the least-squares scale s for them
    (weights w = x²); then 18 spans around it, in ggml's order, each kept when it raises
    (Σ w·x·q)² / Σ w·q². Returns (s, q + n_max) with shapes (n,), (n, 16)."""
    largest = _max_by_magnitude(x)
    tiny = largest.abs() < 1e-15
    safe = torch.where(tiny, 1, largest)
    w = x * x

    def fit(inverse_scale):
        q = torch.round(inverse_scale * x).clamp(-n_max, n_max - 1)
        return q, (w * x * q).sum(dim=1, keepdim=True), (w * q * q).sum(dim=1, keepdim=True)

    q, sum_lx, sum_l2 = fit(-n_max / safe)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, 1), 0)
    best = scale * sum_lx
    tenth = torch.tensor(0.1, dtype=torch.float32)  # ggml's float arithmetic: 0.1f·is
    for i in [i for i in range(-9, 10) if i != 0]:
        tried, lx, l2 = fit(-(n_max + tenth * i) / safe)
        better = (l2 > 0) & (lx * lx > best * l2)
        q = torch.where(better, tried, q)
        scale = torch.where(better, lx / torch.where(l2 > 0, l2, 1), scale)
        best = torch.where(better, scale * lx, best)
    return torch.where(tiny, 0, scale)[:, 0], torch.where(tiny, 0, q + n_max)


def quantize_q6_k(x):
    """Q6_K (layout: gguf_file.dequantize_q6_k). Each group of 16 gets a scale from
    _fit_symmetric_scale; the 16 scales are stored as int8 multiples of d = −(the scale of
    largest magnitude)/128, and every weight is re-coded against the stored values:
    q = round(x / (d·scale_g)) + 32, in 0..63."""
    n = len(x)
    groups = x.reshape(n * 16, 16)
    scales, q = _fit_symmetric_scale(groups)
    scales, q = scales.reshape(n, 16), q.reshape(n, 16, 16)
    largest = _max_by_magnitude(scales)[:, 0]
    empty = largest.abs() < 1e-15
    inverse = -128 / torch.where(empty, 1, largest)
    d = torch.where(empty, 0, 1 / inverse).to(torch.float16)
    sc = torch.round(inverse[:, None] * scales).clamp(max=127)
    sc = torch.where(empty[:, None], 0, sc).to(torch.int8)
    step = d.float()[:, None] * sc.float()
    recoded = torch.round(groups.reshape(n, 16, 16)
                          / torch.where(step == 0, 1, step)[:, :, None]).clamp(-32, 31) + 32
    q = torch.where((step != 0)[:, :, None], recoded, q)
    q = torch.where(empty[:, None, None], 0, q).to(torch.uint8)
    # each half of 128 weights: 4 runs of 32; ql holds runs 0|2<<4 then 1|3<<4, qh the top 2
    # bits of runs 0..3 at bits 0, 2, 4, 6
    runs = q.reshape(n, 2, 4, 32)
    low, top = runs & 0x0F, runs >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)],
                   dim=2)
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8),
                      _fp16_bytes(d)], dim=1)


QUANTIZERS = {  # ggml type id → its quantiser
    TYPE_IDS["F32"]: quantize_f32,
    TYPE_IDS["F16"]: quantize_f16,
    TYPE_IDS["BF16"]: quantize_bf16,
    TYPE_IDS["Q8_0"]: quantize_q8_0,
    TYPE_IDS["Q4_0"]: quantize_q4_0,
    TYPE_IDS["Q4_1"]: quantize_q4_1,
    TYPE_IDS["Q5_0"]: quantize_q5_0,
    TYPE_IDS["Q4_K"]: quantize_q4_k,
    TYPE_IDS["Q6_K"]: quantize_q6_k,
}


def quantized_parts(t: torch.Tensor, type_id: int):
    """The bytes of tensor `t` (any float dtype) stored as ggml type `type_id`, in order, a part
    of about WEIGHTS_AT_ONCE weights at a time, each made float32 only then. Its rows are cut
    into blocks (the row length must be a whole number of blocks: gguf_write.tensor_type
    chooses a type for which it is); blocks are quantised independently, so the parts joined
    are the bytes of the whole."""
    kind = GGML_TYPES[type_id]
    blocks = t.detach().reshape(-1, kind.block_size)
    quantizer = QUANTIZERS[type_id]
    for part in blocks.split(max(1, WEIGHTS_AT_ONCE // kind.block_size)):
        yield quantizer(part.float()).reshape(-1)


def quantize(t: torch.Tensor, type_id: int) -> torch.Tensor:
    """The bytes of tensor `t` stored as ggml type `type_id`, all at once."""
    return torch.cat(list(quantized_parts(t, type_id)))
