"""FP8 matrix products for training (--fp8): the tensor cores of an H100/H200 multiply float8
numbers at twice the rate of bf16 ones.

float8 e4m3 (4 exponent bits, 3 mantissa bits) holds numbers up to 448 with a relative rounding
error of at most 2^-4 (bf16: 2^-8). Its range is small, so a tensor is scaled before the cast and
the scale is kept beside it, in float32, one per row:

    q = round_e4m3(t / s),   s = 2^⌈log2(max|row| / 448)⌉     so that t ≈ q · s, |q| ≤ 448

One scale per row ("rowwise", not one per tensor) so that one large row does not push the small
values of the other rows into e4m3's subnormals or to zero. The scales are powers of two, as in
torchao's rowwise recipe: dividing by them is exact, so the only error is e4m3's own rounding.

Every product of a linear layer y = x Wᵀ, forward and backward, has the same shape, A·Bᵀ with the
sum running along the rows of both A and B:

    forward         y  = x  Wᵀ      A = x  (tokens × in),   B = W  (out × in)
    input gradient  dx = dy W       A = dy (tokens × out),  B = Wᵀ (in × out)
    weight gradient dW = dyᵀ x      A = dyᵀ (out × tokens), B = xᵀ (in × tokens)

so each operand is quantised per row along the summed dimension, and torch._scaled_mm computes

    A·Bᵀ ≈ diag(s_A) · (q_A q_Bᵀ) · diag(s_B)         (the scales applied to the float32 sums)

exactly what the GPU's FP8 kernel wants: q_A row-major, q_Bᵀ column-major (q_B row-major,
transposed as a view), the summed dimension and B's rows multiples of 16, s_A (M, 1), s_Bᵀ (1, N),
output in bf16.

The gradients are e4m3 too, not e5m2 (5 exponent bits, 2 mantissa bits: range to 57344, error
2^-3). torchao's tensorwise recipe casts gradients to e5m2 because one scale for the whole tensor
must cover its largest row, and a gradient's rows differ by orders of magnitude; with a scale per
row each row's largest value lands at 448 anyway, so the range of e5m2 buys nothing and its lost
mantissa bit would double the rounding error. torchao's rowwise recipe makes the same choice (all
three operands e4m3, power-of-two scales), and the GPU's rowwise kernel wants B in e4m3.

Two layers, both in place of the seven projections of every block (attention q, k, v, o and the
MLP's gate, up, down; the embedding, the norms, attention itself, the output head and the loss stay
in bf16):

- LoRA: the frozen base weight is stored in FP8 (`FrozenFloat8Linear`, 1 byte a weight plus a
  float32 scale per output row: half the memory of bf16), once. Forward and input gradient run in
  FP8; there is no weight gradient. The adapters stay float32, their products bf16 (lora.py).
- Full fine-tuning: the float32 master weight stays as it is (`Float8Linear`); each forward and
  backward casts it to FP8 for its product, and the weight gradient dW = dyᵀ x is an FP8 product
  too, returned in the weight's dtype, where AdamW updates the master weight as without --fp8.

A layer whose dimensions are not multiples of 16 keeps its bf16 product (said once). QLoRA is not
combined with it: its base is NF4, 4 bits, which is less memory than FP8, and its products
dequantise to bf16 (speed/quant.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from projections import PROJECTIONS, is_target, replace_module

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
FP8_CAPABILITY = (8, 9)
# the GPU's FP8 kernels need the summed dimension and the second operand's rows in multiples of 16
ALIGNMENT = 16
# A max|row| below this is an all-zero row (a prompt token's gradient is exactly zero): it gets
# a tiny scale instead of 0, and its zeros stay zeros instead of 0/0.
TINY = 1e-30


def check_fp8(method: str, precision: str, device: str, dora: bool = False, merge: bool = False,
              allow_cpu: bool = False):
    """Refuse --fp8 where it cannot run, in one line: a device without FP8 tensor cores, QLoRA,
    another precision than bf16, DoRA, LoRA's --merge. `allow_cpu`: the tests (torch emulates the
    FP8 products on a CPU, slowly: correct, but no speed to gain)."""
    if device.startswith("cuda"):
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            raise UserError(f"--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or "
                            f"higher: Ada, Hopper, Blackwell); {device} "
                            f"({torch.cuda.get_device_name(device)}) has "
                            f"{capability[0]}.{capability[1]}")
    elif not (allow_cpu and device == "cpu"):
        raise UserError(f"--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or "
                        f"higher); --device {device} has none")
    if method == "qlora":
        raise UserError("--fp8 is for --method lora or full: QLoRA's frozen base is NF4, 4 bits a "
                        "weight (less memory than FP8's 8), and its products dequantise to bf16; "
                        "--method lora --fp8 stores the base in FP8 and multiplies in FP8")
    if precision != "bf16":
        raise UserError(f"--fp8 needs --precision bf16 (got {precision}): everything around the "
                        "FP8 products (adapters, norms, attention, the loss) runs in bf16")
    if dora:
        raise UserError("--fp8 does not combine with --dora: DoRA's forward multiplies by the "
                        "whole 16-bit weight (to take its row norms), not by the FP8 one")
    if merge and method == "lora":  # (full fine-tuning's weights are its own, never FP8)
        raise UserError("--fp8 with --merge would merge the adapter into the FP8-rounded base; "
                        "merge it into the original weights instead: python export.py OUT --gguf "
                        "FILE, or load OUT/peft on the base model with PEFT")


# ---------------------------------------------------------------- the arithmetic

def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (M, K), any float dtype → (q, s): q e4m3 (M, K) row-major, s float32 (M, 1), t ≈ q · s,
    s = 2^⌈log2(max|row| / 448)⌉. (A transposed view gives its transpose's rows, copied
    row-major, in FP8: the cheapest place for the transpose, 1 byte a value.)"""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp_min(TINY)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    q = (t.float() / scale).to(E4M3)  # exact division (a power of two), then one rounding
    return q.contiguous(), scale


def fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               fast_accum: bool = False) -> torch.Tensor:
    """(a · a_scale) · (b · b_scale)ᵀ in bf16, from two row-quantised operands (quantize_rows):
    a (M, K), b (N, K), K and N multiples of 16. `fast_accum`: Hopper's faster accumulation, which
    adds the float32 partial sums less often; torchao uses it for the forward product only, and so
    do we (gradients summed over many tokens keep the exact accumulation)."""
    return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.t(),
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def pad_columns(t: torch.Tensor) -> torch.Tensor:
    """t (R, C) with C padded by zero columns to a multiple of 16: the weight gradient sums over
    tokens, whose count is anything, and zeros add nothing to a sum."""
    missing = -t.shape[1] % ALIGNMENT
    return F.pad(t, (0, missing)) if missing else t


class FrozenFloat8Matmul(torch.autograd.Function):
    """y = x Wᵀ for a frozen W stored in FP8 as W = diag(s_W) · Q (one scale per output row).

    forward:   y  = diag(s_x) (q_x Qᵀ) diag(s_W)            (x quantised per token)
    backward:  dx = dy W = (dy · diag(s_W)) Q               (no gradient for W: it is frozen)

    For dx the sum runs over the output dimension, along Q's columns: Q's per-output-row scales
    are folded into dy's columns first (exact algebra), then dy·diag(s_W) is quantised per token
    and Q is used as it is (scale 1), transposed into a temporary row-major copy (1 byte a weight,
    freed after the product). Only Q and s_W are kept for backward: nothing the layer does not hold
    anyway."""

    @staticmethod
    def forward(ctx, x, q, scale):
        ctx.save_for_backward(q, scale)
        ctx.x_dtype = x.dtype
        return fp8_matmul(*quantize_rows(x), q, scale, fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        q, scale = ctx.saved_tensors
        ones = torch.ones(q.shape[1], 1, device=q.device)
        dx = fp8_matmul(*quantize_rows(dy.float() * scale.t()), q.t().contiguous(), ones)
        return dx.to(ctx.x_dtype), None, None


class Float8Matmul(torch.autograd.Function):
    """y = x Wᵀ for a trained W (float32 master weights, or bf16 with --pure-bf16), which is cast
    to FP8 for each product and never changed here.

    forward:   y  = x Wᵀ     x per token, W per output row
    backward:  dx = dy W     dy per token, W per input column (the rows of Wᵀ)
               dW = dyᵀ x    dy and x per feature, summing over tokens (padded to 16 with zeros)

    x and W are kept for backward as they are (autocast would keep a bf16 copy of each float32
    W); the FP8 copies are made again there, which costs a read of each, not memory."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return fp8_matmul(*quantize_rows(x), *quantize_rows(weight), fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_matmul(*quantize_rows(dy), *quantize_rows(weight.t())).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = fp8_matmul(*quantize_rows(pad_columns(dy.t())), *quantize_rows(pad_columns(x.t())))
            grad_w = dw.to(weight.dtype)
        return grad_x, grad_w


# ---------------------------------------------------------------- the layers

class FrozenFloat8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in FP8: `weight_fp8` e4m3 (out × in) and
    `weight_scale` float32 (out × 1), buffers (moved by .to(device), never trained). Like
    speed/quant.py's NF4Linear it subclasses nn.Linear (lora.LoRALinear wraps it) without its
    __init__, and `weight` is a read-only property: the dequantised matrix, a new bf16 tensor on
    every read. (Do dtype casts before: .to(dtype) would cast the FP8 buffers too.)"""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale).to(torch.bfloat16)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)  # (tokens × in): the products are 2-D
        y = FrozenFloat8Matmul.apply(rows, self.weight_fp8, self.weight_scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


class Float8Linear(nn.Linear):
    """An nn.Linear (the same weight Parameter, trained as before) whose products run in FP8:
    Float8Matmul."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta")  # meta: no memory spent on weights about to be replaced
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        y = Float8Matmul.apply(rows, self.weight).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def use_fp8(model: nn.Module, method: str, say=print) -> list[str]:
    """Put FP8 layers in place of the seven projections of every block, in place: for LoRA a
    FrozenFloat8Linear (before apply_lora, which then wraps it), for full fine-tuning a
    Float8Linear around the same weight. One layer at a time, so the 16-bit weights of a LoRA base
    are freed as they go. A layer with a dimension that is not a multiple of 16 keeps its bf16
    product, said in one line. Returns the names of the layers that became FP8."""
    chosen, kept = [], []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and is_target(name, PROJECTIONS.values()):
            aligned = module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0
            (chosen if aligned else kept).append(name)
    for name in chosen:
        linear = model.get_submodule(name)
        if method == "full":
            replace_module(model, name, Float8Linear.from_linear(linear))
        else:
            replace_module(model, name, FrozenFloat8Linear(linear.weight, linear.bias))
        del linear  # (LoRA: the last reference to the 16-bit weight)
    if kept:
        shapes = {f"{m.out_features}×{m.in_features}" for m in map(model.get_submodule, kept)}
        say(f"note: --fp8: {len(kept)} of {len(chosen) + len(kept)} projections keep bf16 "
            f"products: their shapes ({', '.join(sorted(shapes))}) are not multiples of 16, "
            "which the FP8 kernels need")
    return chosen
