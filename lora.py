"""LoRA: fine-tune a big model by training two thin matrices per layer instead of the layer.

A pretrained linear layer computes y = x Wᵀ with W of shape (out × in). LoRA (Hu et al. 2021)
freezes W and learns a low-rank change ΔW = B A of rank r ≪ min(in, out):

    y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ        A: (r × in), B: (out × r)

A starts random (Kaiming-uniform, as PEFT does) and B starts at zero, so B A = 0 and training
starts exactly at the pretrained model. alpha / r is a fixed scale, so changing r does not
change how big the update is at a given learning rate; rsLoRA (Kalajievski 2023) uses
alpha / √r instead, which keeps learning stable at large r.

Why it saves memory: full fine-tuning with AdamW keeps, for every weight, a gradient and two
optimizer moments (plus often a float32 master copy): ~16 bytes a parameter, ~110 GB for a 7B
model. With LoRA the frozen W needs none of that, only its 2 bytes (bf16). The adapter is tiny:
r=16 on q and v of Llama-2-7B is 32 layers × 2 × 16 × (4096 + 4096) = 8.4M parameters, 0.12%
of the model, 34 MB in float32, and its optimizer state is about 100 MB more.
(Activations for the backward pass are still needed; see --grad-ckpt.)

After training, ΔW can be folded into W (`merge_lora`): the result is an ordinary model that
runs exactly as fast as the original.

DoRA (Liu et al. 2024) splits each row of the weight into a length and a direction, trains the
length as a vector m (out,) and the direction with LoRA:

    W' = m · (W + s·B A) / ‖W + s·B A‖_row        (the norm is treated as a constant, §4.3)

Names: our modules are `layers.{i}.attn.q_proj` etc. (model.py). adapter.py saves and loads the
adapter's files; export.py writes it in Hugging Face PEFT's names and row order, and a merged
transformers checkpoint.
"""
import math
from collections import Counter
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from projections import PROJECTIONS, is_target, replace_module


class LoRALinear(nn.Module):
    """An nn.Linear with a frozen weight plus a trainable low-rank update:
    base(x) + scale · x AᵀBᵀ."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise UserError(f"LoRA wraps nn.Linear layers, got {type(base).__name__}")
        if r < 1 or not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA needs rank r >= 1 and 0 <= dropout < 1 "
                            f"(got r={r}, dropout={dropout})")
        self.base = base  # the same module, so the same weight object: a tied weight stays tied
        base.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.rslora = rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        # The device of any tensor the base holds. Not base.weight: an NF4 base (quant.py) keeps
        # 4-bit codes and dequantises the whole matrix on every read of `weight`.
        device = [*base.parameters(), *base.buffers()][0].device
        # float32 adapters even on a bf16 base: tiny, and small updates are not rounded away
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear and PEFT use
        self.merged = False
        self.weight_is_shared = False  # set by apply_lora when another module uses the same matrix

    def lora_output(self, x):
        """dropout(x) Aᵀ Bᵀ, through the r-wide bottleneck: never builds the (out × in) B A."""
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # under autocast the matmuls pick their own dtype
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # ΔW is already inside base.weight
            return y
        # in place: no second (…, out) tensor
        return y.add_(self.lora_output(x), alpha=self.scale)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B A, (out × in), in float32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self):
        """W ← W + scale·B A, computed in float32 and rounded to W's dtype once. Afterwards
        forward is just base(x). A weight shared with another module (a tied lm_head) is not
        written into: the merged matrix becomes this layer's own, and unmerge gives the shared
        one back."""
        if self.merged:
            return
        merged = self.merged_weight()
        if self.weight_is_shared:
            self.shared_weight = self.base.weight  # still held by the embedding: costs no memory
            self.base.weight = nn.Parameter(merged.to(self.base.weight.dtype), requires_grad=False)
        else:
            self.base.weight.copy_(merged)  # in place: no second copy of a big matrix
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge: exact up to float32 rounding (a bf16 W keeps one rounding error)."""
        if not self.merged:
            return
        if self.weight_is_shared:
            self.base.weight = self.shared_weight
            del self.shared_weight
        else:
            self.base.weight.copy_(self.unmerged_weight())
        self.merged = False

    def merged_weight(self):
        return self.base.weight.float() + self.delta_weight()    # W + ΔW

    def unmerged_weight(self):
        return self.base.weight.float() - self.delta_weight()    # (W + ΔW) − ΔW

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"
                + (", merged" if self.merged else ""))


class DoRALinear(LoRALinear):
    """DoRA: y = m / ‖W + s·B A‖_row · (x Wᵀ + s·dropout(x) AᵀBᵀ) + bias, with m a
    trainable (out,) vector.

    Initialised to m = ‖W‖_row, so it too starts at the pretrained layer. The row norm is
    detached (no gradient flows through it), as in the paper's §4.3 and in PEFT, so adapters
    exported to PEFT give the same outputs. (With dropout > 0, PEFT's training forward rescales
    W·dropout(x) rather than W·x; in eval mode the two are identical.) Each forward builds
    W + s·B A in float32 to take its norm: DoRA's price in memory and time over plain LoRA.
    """

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__(base, r, alpha, dropout, rslora, dtype)
        self.magnitude = nn.Parameter(self.row_norm().to(dtype))

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ of each output row, float32, outside the autograd graph."""
        return (self.base.weight.float() + self.delta_weight()).norm(dim=1)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        # On an NF4 base each read of base.weight dequantises the whole matrix (quant.py): here
        # twice a forward, for the matmul and in row_norm, and autograd keeps the first copy for
        # the backward pass (which NF4Linear's own forward avoids).
        y = F.linear(x, self.base.weight).add_(self.lora_output(x), alpha=self.scale)
        y = y * (self.magnitude / self.row_norm()).to(y.dtype)
        return y if self.base.bias is None else y + self.base.bias

    def merged_weight(self):
        """W' = m · (W + s·B A) / ‖W + s·B A‖_row. The norm is kept, so that unmerge can
        divide it back out."""
        self.merged_norm = self.row_norm()
        row_scale = self.magnitude.float() / self.merged_norm
        return (self.base.weight.float() + self.delta_weight()) * row_scale[:, None]

    def unmerged_weight(self):
        """W = W' · ‖W + s·B A‖_row / m − s·B A."""
        row_scale = self.merged_norm / self.magnitude.float()
        return self.base.weight.float() * row_scale[:, None] - self.delta_weight()


# ---------------------------------------------------------------- which layers get adapters

# short name (used on the command line) -> module path: the seven projections, and the output head
LORA_TARGETS = {**PROJECTIONS, "head": "lm_head"}
# their Hugging Face names (PEFT's target_modules), the last part of the path: 'q' -> 'q_proj'
HF_TARGET_NAMES = {short: path.rpartition(".")[2] for short, path in LORA_TARGETS.items()}


def parse_targets(spec: str) -> list[str]:
    """'q,v' -> ['q', 'v']; 'all' -> the seven projections (like PEFT's all-linear, head
    excluded); 'all,head' adds the output head."""
    valid = f"valid: {', '.join(LORA_TARGETS)}, all"
    names = []
    for part in str(spec).lower().split(","):
        part = part.strip()
        if not part:
            continue
        for name in PROJECTIONS if part == "all" else [part]:
            if name not in LORA_TARGETS:
                raise UserError(f"unknown LoRA target {name!r}; {valid}")
            if name not in names:
                names.append(name)
    if not names:
        raise UserError(f"no LoRA targets in {spec!r}; {valid}")
    return names


def lora_layers(model: nn.Module) -> dict:
    """{module name: LoRALinear} for every adapter in the model, e.g. 'layers.0.attn.q_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _short_name(module_name: str) -> str:
    """'layers.0.attn.q_proj' -> 'q'."""
    return next(short for short, path in LORA_TARGETS.items() if is_target(module_name, [path]))


def apply_lora(model: nn.Module, targets, r: int = 16, alpha: float = 32, dropout: float = 0.0,
               rslora: bool = False, dora: bool = False,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap the targeted nn.Linear layers (in place) and freeze everything else.

    targets: a spec string ('q,v', 'all', 'all,head') or a list of short names.
    Afterwards only lora_A, lora_B (and DoRA's magnitude) have requires_grad=True.
    """
    targets = parse_targets(targets if isinstance(targets, str) else ",".join(targets))
    if lora_layers(model):
        raise UserError("the model already has LoRA layers; merge_lora it first or start from "
                        "the base model")
    paths = [LORA_TARGETS[t] for t in targets]
    chosen = [name for name, _ in model.named_modules() if is_target(name, paths)]
    if not chosen:
        raise UserError(f"no module of the model matches the LoRA targets {targets}")
    model.requires_grad_(False)  # the pretrained weights: no gradients, no optimizer state
    # how many modules hold each parameter: a tied weight has 2 users
    users = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    layer_class = DoRALinear if dora else LoRALinear
    for name in chosen:
        layer = layer_class(model.get_submodule(name), r, alpha, dropout, rslora, dtype)
        layer.weight_is_shared = users[id(layer.base.weight)] > 1
        replace_module(model, name, layer)
    return model


def _weight_in_buffers(module: nn.Module) -> bool:
    """A linear layer whose weight is not a parameter: an NF4 base (speed/quant.py) keeps its weight
    as 4-bit codes in buffers."""
    own_parameters = dict(module.named_parameters(recurse=False))
    return isinstance(module, nn.Linear) and "weight" not in own_parameters


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A tied matrix counts once, and so does a weight kept
    in buffers (NF4)."""
    params = list(model.parameters())  # parameters() already skips the second use of a tied weight
    trainable = sum(p.numel() for p in params if p.requires_grad)
    in_buffers = sum(m.in_features * m.out_features for m in model.modules()
                     if _weight_in_buffers(m))
    return trainable, sum(p.numel() for p in params) + in_buffers


def lora_settings(model: nn.Module) -> dict:
    """The hyperparameters of the model's adapters, read back from its LoRALinear layers."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers (apply_lora or load_adapter first)")
    first = next(iter(layers.values()))
    targets = {_short_name(name) for name in layers}
    return {"r": first.r, "alpha": first.alpha, "dropout": first.dropout,
            "targets": [t for t in LORA_TARGETS if t in targets],
            "rslora": first.rslora, "dora": isinstance(first, DoRALinear)}


# ---------------------------------------------------------------- merging

def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put the plain nn.Linear back (in place).

    The result has no LoRA modules and the state_dict keys of the original model. A tied
    lm_head with an adapter gets its own merged matrix (the embedding must not change), so the
    merged model is untied, and model.config is replaced by one that says so.
    """
    # (QLoRA: a 4-bit NF4 weight cannot hold W + ΔW; the caller makes every NF4 layer a 16-bit
    # nn.Linear first, with quant.dequantize_model)
    for name, layer in lora_layers(model).items():
        layer.merge()
        replace_module(model, name, layer.base)
    config = getattr(model, "config", None)
    if config is not None and config.tie_embeddings:
        if model.lm_head.weight is not model.embed_tokens.weight:  # the head's own merged matrix
            model.config = replace(config, tie_embeddings=False)
    model.requires_grad_(True)  # an ordinary model again (apply_lora had frozen it)
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors, under our names: 'layers.0.attn.q_proj.lora_A', ...lora_B,
    ...magnitude."""
    # recurse=False: the adapter's own tensors, not base.weight
    return {f"{name}.{p_name}": p.detach()
            for name, layer in lora_layers(model).items()
            for p_name, p in layer.named_parameters(recurse=False)}
