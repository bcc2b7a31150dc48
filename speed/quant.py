"""QLoRA's 4-bit NormalFloat (NF4) weights, in plain PyTorch (Dettmers et al. 2023).

QLoRA = LoRA on a base model whose frozen linear weights are stored in 4 bits instead of 16:
Llama-2-7B shrinks from 13.5 GB to 3.9 GB (its embedding and output head stay 16-bit), and the
adapters still train in bf16/fp32.

    quantise:   split W into blocks of 64 consecutive values; per block, absmax = max|w|;
                code = index of the NF4 level nearest to w / absmax     (4 bits, 0..15)
    dequantise: w ≈ NF4_LEVELS[code] · absmax                  (one lookup, one multiply)

Why these 16 levels: pretrained weights are close to normally distributed, so the levels are
quantiles of N(0, 1) scaled to [-1, 1]: each level is (about) equally likely to be used, which
wastes fewer codes than 16 evenly spaced ones. An exact 0 is kept (padding, zero weights).

Memory per parameter: 4 bits for the code + 32/64 = 0.5 bits for the float32 absmax. Double
quantisation stores the absmaxes themselves in 8 bits (in groups of 256, with one float32 scale
per group and one float32 mean): 8/64 + 32/(64·256) = 0.127 bits, so 4.127 bits in all.

The frozen weight is never trained, so nothing needs it in 16 bits except the matmul: NF4Linear
dequantises it right before F.linear, and again in the backward pass (see `NF4Matmul`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from projections import PROJECTIONS, is_target, replace_module

# The 16 NF4 levels, as in the paper and bitsandbytes. They are `nf4_levels_from_normal()`:
# 8 positive quantiles Φ⁻¹(p) for p evenly spaced from `offset` down to 0.5 (excluded),
# 7 negative ones the same way, plus an exact 0; then divided by the largest, so they span
# [-1, 1]. One more level on the positive side (8 vs 7): 16 levels that include an exact 0
# cannot be symmetric.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
DOUBLE_QUANT_GROUP = 256  # absmaxes that share one float32 scale under double quantisation
# what quantize_model stores in NF4 unless told otherwise: the seven projections of every block
DEFAULT_TARGETS = tuple(PROJECTIONS.values())


def nf4_levels_from_normal() -> torch.Tensor:
    """Rebuild NF4_LEVELS from the normal quantile function Φ⁻¹ (torch.special.ndtri).

    offset = ½·((1 − 1/(2·15)) + (1 − 1/(2·16))) ≈ 0.9677 keeps the outermost quantile
    finite (Φ⁻¹(1) = ∞); it is the paper's choice, halfway between the values for 15 and 16
    levels."""
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes a weight of `numel` values takes in NF4 (what NF4Linear's state_dict holds)."""
    n_blocks = math.ceil(numel / block_size)
    codes = n_blocks * block_size // 2  # two 4-bit codes a byte (the last block padded with zeros)
    if not double_quant:
        return codes + 4 * n_blocks  # one float32 absmax per block
    # an int8 per block, a float32 step per group of blocks, one float32 mean
    return codes + n_blocks + 4 * math.ceil(n_blocks / DOUBLE_QUANT_GROUP) + 4


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes 0..15, n even -> (n/2,) uint8: the first of each pair in the high 4 bits."""
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """(n/2,) uint8 -> (n,) uint8 codes 0..15; the inverse of pack_codes."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).flatten()


@dataclass
class NF4Weight:
    """A weight in NF4. Only tensors and two plain fields, so a module can hold them as buffers."""
    packed: torch.Tensor               # uint8 (n_blocks·block_size/2,): 4-bit codes, two a byte
    absmax: torch.Tensor | None        # float32 (n_blocks,): each block's scale (no double quant)
    absmax_codes: torch.Tensor | None  # int8 (n_blocks,): the scales in 8 bits (double quant)...
    absmax_scale: torch.Tensor | None  # float32 (n_groups,): ...times a step per 256 of them...
    absmax_mean: torch.Tensor | None   # float32 (): ...plus their mean
    levels: torch.Tensor               # float32 (16,): NF4_LEVELS, on the weight's device
    shape: tuple
    block_size: int

    TENSORS = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_mean", "levels")

    def block_scales(self) -> torch.Tensor:
        """The float32 absmax of every block, undoing double quantisation if it was used."""
        if self.absmax is not None:
            return self.absmax
        n_blocks = self.absmax_codes.numel()
        padded = F.pad(self.absmax_codes, (0, -n_blocks % DOUBLE_QUANT_GROUP))
        codes = padded.view(-1, DOUBLE_QUANT_GROUP)
        return (codes.float() * self.absmax_scale[:, None]).flatten()[:n_blocks] + self.absmax_mean


def quantize_absmax(absmax: torch.Tensor):
    """Double quantisation: the float32 scales -> int8 codes, a float32 step per group of
    256, and their mean.

    The absmaxes are all positive and similar in size, so their mean is subtracted first and
    the int8 range covers only their spread:
        absmax ≈ mean + code · step,    step = max |absmax − mean| over the group / 127"""
    mean = absmax.mean()
    centred = absmax - mean
    groups = F.pad(centred, (0, -absmax.numel() % DOUBLE_QUANT_GROUP)).view(-1, DOUBLE_QUANT_GROUP)
    step = groups.abs().amax(dim=1) / 127
    codes = torch.round(groups / step.clamp_min(1e-12)[:, None]).to(torch.int8)
    return codes.flatten()[:absmax.numel()], step, mean


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise any-shaped `w` to NF4, in blocks of `block_size` consecutive values (row-major).

    A size that is not a multiple of block_size is padded with zeros (exact in NF4) and cut off
    again by dequantize_nf4. Work is done in float32 on w's device, one weight at a time."""
    if block_size < 2 or block_size % 2:
        raise UserError(f"NF4 block size must be an even number >= 2, got {block_size}")
    flat = w.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalised = blocks / absmax.clamp_min(1e-12)[:, None]  # in [-1, 1]; an all-zero block stays 0
    levels = NF4_LEVELS.to(w.device)
    # nearest level = how many midpoints between neighbouring levels lie below the value
    midpoints = (levels[1:] + levels[:-1]) / 2
    packed = pack_codes(torch.bucketize(normalised.flatten(), midpoints, out_int32=True))
    if double_quant:
        return NF4Weight(packed, None, *quantize_absmax(absmax), levels, tuple(w.shape), block_size)
    return NF4Weight(packed, absmax, None, None, None, levels, tuple(w.shape), block_size)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w ≈ levels[code] · absmax of its block, returned in `dtype` and w's original shape.

    Vectorised: unpack, one table lookup, one broadcast multiply. Computed in float32 so each
    value is rounded to `dtype` once; under torch.compile these ops fuse into one kernel, so the
    float32 intermediates never reach memory and dequantising stays cheap next to the matmul."""
    codes = unpack_codes(q.packed).int()  # int, not uint8: uint8 indices would mean a boolean mask
    values = q.levels[codes].view(-1, q.block_size) * q.block_scales()[:, None]
    return values.flatten()[:math.prod(q.shape)].view(q.shape).to(dtype)


class NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantised on the fly, in the forward pass and again in the backward.

    F.linear(x, dequantize_nf4(q)) would also work, but autograd would keep each dequantised W
    until the backward pass (it needs W for dL/dx = dL/dy · W): a 16-bit copy of every layer,
    the very memory QLoRA is meant to save. Here only `q`, which the layer holds anyway, is kept."""

    @staticmethod
    def forward(ctx, x, q: NF4Weight, dtype: torch.dtype):
        # kept on ctx, not save_for_backward: q is not a graph input and is never written to
        ctx.q = q
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        return F.linear(x.to(dtype), dequantize_nf4(q, dtype))

    @staticmethod
    def backward(ctx, grad_y):
        # W is frozen: no gradient for it, only for x
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = grad_y.to(ctx.dtype) @ dequantize_nf4(ctx.q, ctx.dtype)  # dL/dx = dL/dy · W
        return grad_x.to(ctx.x_dtype), None, None


class NF4Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in NF4 (as buffers: moved by .to(), never
    trained).

    It subclasses nn.Linear so that code written for linear layers accepts it (lora.LoRALinear
    checks isinstance(base, nn.Linear)), but it skips nn.Linear.__init__, which would allocate
    the full weight. `weight` is a read-only property: the dequantised matrix in compute_dtype, a
    fresh tensor each time (writing into it changes nothing; see to_linear for merging)."""

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype=torch.bfloat16):
        nn.Module.__init__(self)
        if len(q.shape) != 2:
            raise UserError(f"NF4Linear needs a 2-D weight (out × in), got shape {q.shape}")
        self.out_features, self.in_features = q.shape
        self.block_size = q.block_size
        self.compute_dtype = compute_dtype
        for name in NF4Weight.TENSORS:  # the level table is rebuilt from NF4_LEVELS, so not saved
            self.register_buffer(name, getattr(q, name), persistent=name != "levels")
        bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias=None, block_size=64, double_quant=True,
                    compute_dtype=torch.bfloat16):
        """Quantise one weight (and keep its bias): the per-layer step of quantize_model and of
        quantise-on-load (checkpoint.load_checkpoint)."""
        return cls(quantize_nf4(w, block_size, double_quant), bias, compute_dtype)

    @property
    def quantized(self) -> NF4Weight:
        return NF4Weight(*(getattr(self, name) for name in NF4Weight.TENSORS),
                         (self.out_features, self.in_features), self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised (out × in) matrix in compute_dtype: a new tensor on every read.

        forward never reads it (NF4Matmul dequantises by itself), but DoRA does: a DoRALinear on
        an NF4 base (lora.py) reads it twice a forward, so the whole matrix is dequantised twice
        per layer and step, and one 16-bit copy is kept for the backward pass. Slower and bigger
        than LoRA on NF4, but correct."""
        return dequantize_nf4(self.quantized, self.compute_dtype)

    def forward(self, x):
        # compute in x's dtype, or in autocast's when it is on (it would cast to that anyway)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        y = NF4Matmul.apply(x, self.quantized, dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain (frozen) nn.Linear holding the dequantised weight: how a QLoRA model is
        merged."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=dtype)  # meta: no memory spent on a throwaway init
        linear.weight = nn.Parameter(dequantize_nf4(self.quantized, dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.to(dtype), requires_grad=False)
        return linear

    def extra_repr(self):
        double = "double-quantised " if self.absmax is None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, NF4 blocks of {self.block_size}, "
                f"{double}compute {self.compute_dtype}")


@torch.no_grad()
def quantize_model(model: nn.Module, targets=None, block_size: int = 64,
                   double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the targeted nn.Linear layers by NF4Linear, in place; return the model.

    targets: module paths (projections.is_target), default the seven projections of every block
    (DEFAULT_TARGETS); add "lm_head" for the output head. The embedding and norms stay as they
    are. One layer at a time: each original weight is released as soon as its layer is
    replaced, so the 16-bit model and the 4-bit one never both exist in full.
    Do dtype casts (model.to(torch.bfloat16)) before this: .to(dtype) would also cast the
    float32 scales, adding a (small) rounding error to every block."""
    paths = tuple(targets or DEFAULT_TARGETS)
    chosen = [name for name, m in model.named_modules()
              if type(m) is nn.Linear and is_target(name, paths)]
    if not chosen:
        raise UserError(f"no nn.Linear layer of the model matches the quantisation targets "
                        f"{list(paths)}")
    embedding = getattr(model, "embed_tokens", None)
    for name in chosen:
        linear = model.get_submodule(name)
        if embedding is not None and linear.weight is embedding.weight:
            raise UserError(f"{name} shares its weight with the embedding (tied); it cannot be "
                            "quantised alone")
        quantized = NF4Linear.from_weight(linear.weight, linear.bias, block_size, double_quant,
                                          compute_dtype)
        replace_module(model, name, quantized)
        del linear  # the last reference: the 16-bit weight is freed here, before the next layer
    return model


class HostEmbedding(nn.Embedding):
    """A frozen token embedding kept in CPU memory. A lookup needs only the rows of the batch's
    tokens, so only those go to the GPU: for Llama-3-8B, 1 GiB of bf16 stays off the GPU, and a
    step of 2×2048 tokens moves 32 MiB. For QLoRA, where the embedding would otherwise be a fifth
    of the GPU memory the frozen model takes. (Call it after the model's last .to(device):
    .to() would move it back.)"""

    def __init__(self, weight: torch.Tensor):
        super().__init__(*weight.shape, _weight=weight.detach().cpu(), _freeze=True)

    def forward(self, tokens):
        ids = tokens.cpu().flatten()
        # gathered into page-locked memory, from where the copy to the GPU runs on its own while
        # the CPU goes on queuing the blocks (torch caches such buffers: no allocation per step)
        rows = torch.empty(len(ids), self.embedding_dim, dtype=self.weight.dtype,
                           pin_memory=torch.cuda.is_available())
        torch.index_select(self.weight, 0, ids, out=rows)
        return rows.view(*tokens.shape, -1).to(tokens.device, non_blocking=True)


def embedding_to_host(model: nn.Module):
    """Put the model's input embedding in CPU memory (HostEmbedding) when the rest is on a GPU
    and the embedding is untied (a tied one is the output head too: it stays)."""
    embedding = model.embed_tokens
    if embedding.weight.device.type != "cpu" and embedding.weight is not model.lm_head.weight:
        model.embed_tokens = HostEmbedding(embedding.weight)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Linear (also the `base` inside a LoRALinear) by a plain nn.Linear, in place.

    Before lora.merge_lora (export, --merge), which then folds the adapters in as usual:
    W' = deq(W) + s·B A."""
    quantized = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in quantized:
        replace_module(model, name, model.get_submodule(name).to_linear(dtype))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's NF4 layers (their state_dict tensors: codes and scales)."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, NF4Linear)
               for name, t in m.state_dict().items() if not name.endswith("bias"))
