"""The LLaMA decoder, written out in one file you can read top to bottom.

    tokens ─► embed_tokens ─► n_layers × Block ─► norm ─► lm_head ─► logits
    Block:  x = x + Attention(RMSNorm(x))      (grouped-query attention with RoPE)
            x = x + MLP(RMSNorm(x))            (SwiGLU)

Every LLaMA generation (Llama-2, Llama-3/3.1/3.2, TinyLlama, llama2.c's tinyllamas) is this
network with different numbers in `ModelConfig`. Reading weights and configs from files lives in
checkpoint.py (and formats.py, gguf_file.py); this file only knows the architecture.

Conventions: weight names are ours (`layers.3.attn.q_proj.weight`); q/k rows are in Meta's
original order, where RoPE rotates adjacent pairs (x[2i], x[2i+1]). Hugging Face stores q/k
permuted; formats/checkpoint.py undoes that in one place.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding tokens); PyTorch's default
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --precision
DEFAULT_PRECISION = "bf16 on GPUs that have it, else fp16; fp32 on a CPU"  # (default_precision)


def default_precision(device: str) -> str:
    """DEFAULT_PRECISION: bf16 has float32's range in half the bytes; fp16 needs loss scaling."""
    if not str(device).startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position is trained to predict. `labels` line up with the tokens (Hugging
    Face's convention), and position t predicts token t+1, so the targets are the labels shifted
    left by one; the last position predicts nothing. The one place the shift is written."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@dataclass(frozen=True)
class Rule:
    """What a config value must be: `holds(value)` says whether it is, `text` says it in words.
    The readers of checkpoint files check each value they take with these (naming the file and
    its key), and ModelConfig checks its fields with them: one rule per kind of value."""
    text: str
    holds: Callable


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # (True is an int)


SIZE = Rule("a whole number >= 1", lambda value: type(value) is int and value >= 1)  # not True
POSITIVE = Rule("a finite number > 0",
                lambda value: _is_number(value) and math.isfinite(value) and value > 0)
FLAG = Rule("true or false", lambda value: isinstance(value, bool))
FIELD_RULES = {"dim": SIZE, "n_layers": SIZE, "n_heads": SIZE, "n_kv_heads": SIZE,
               "ffn_hidden": SIZE, "vocab_size": SIZE, "norm_eps": POSITIVE, "rope_theta": POSITIVE,
               "max_seq_len": SIZE, "tie_embeddings": FLAG}
LLAMA3_SCALING_RULES = {"factor": POSITIVE, "low_freq_factor": POSITIVE,
                        "high_freq_factor": POSITIVE, "original_max_position_embeddings": SIZE}


@dataclass
class ModelConfig:
    dim: int = 4096                  # width of the residual stream
    n_layers: int = 32
    n_heads: int = 32                # query heads
    n_kv_heads: int = 32             # key/value heads; fewer than n_heads = grouped-query attention
    ffn_hidden: int = 11008          # SwiGLU hidden width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 style: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None = plain RoPE
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False     # lm_head shares the embedding (Llama-3.2-1B/3B, llama2.c)
    head_dim: int | None = None      # defaults to dim // n_heads

    def __post_init__(self):
        rules = dict(FIELD_RULES, head_dim=SIZE) if self.head_dim is not None else FIELD_RULES
        for name, rule in rules.items():
            value = getattr(self, name)
            if not rule.holds(value):
                raise UserError(f"model config: {name}={value!r}, but it must be {rule.text}")
        scaling = self.rope_scaling
        if scaling is not None and (not isinstance(scaling, dict)
                                    or scaling.keys() != LLAMA3_SCALING_RULES.keys()):
            raise UserError(f"model config: rope_scaling={scaling!r}, but it must be None or "
                            f"{{{', '.join(LLAMA3_SCALING_RULES)}}}")
        for name, rule in LLAMA3_SCALING_RULES.items():
            if scaling is not None and not rule.holds(scaling[name]):
                raise UserError(f"model config: rope_scaling {name}={scaling[name]!r}, but it "
                                f"must be {rule.text}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise UserError(f"model config: dim={self.dim} is not a multiple of "
                                f"n_heads={self.n_heads} (and no head_dim is given)")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of "
                            f"n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown model shape {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


def llama3_scaling(factor: float) -> dict:
    """Llama-3.1's rope_scaling: only `factor` differs between models (8 for 3.1, 32 for 3.2
    1B/3B); the other constants are Meta's."""
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS = {  # the public shapes, so a model can be built (and benchmarked) without a file
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172, vocab_size=512,
                 max_seq_len=512),
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, ffn_hidden=172, vocab_size=512,
                        max_seq_len=512, tie_embeddings=True),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                         vocab_size=49152, rope_theta=100000.0, max_seq_len=8192,
                         tie_embeddings=True),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632,
                           vocab_size=32000, max_seq_len=2048),
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
                       vocab_size=32000, max_seq_len=4096),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                       vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                         vocab_size=128256, rope_theta=500000.0, rope_scaling=llama3_scaling(8.0),
                         max_seq_len=131072),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                         vocab_size=128256, rope_theta=500000.0, rope_scaling=llama3_scaling(32.0),
                         max_seq_len=131072, tie_embeddings=True),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden=8192,
                         vocab_size=128256, rope_theta=500000.0, rope_scaling=llama3_scaling(32.0),
                         max_seq_len=131072, tie_embeddings=True),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                        vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 (bf16 squares lose precision)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(config: ModelConfig, device=None) -> torch.Tensor:
    """θ_i = rope_theta^(-2i/head_dim): one rotation speed per pair of channels.

    Llama-3.1 stretches context by slowing the low frequencies (long wavelengths) by `factor`,
    keeping the high ones, and blending smoothly in between (Meta's `apply_scaling`).
    """
    hd = config.head_dim
    even_channels = torch.arange(0, hd, 2, device=device, dtype=torch.float32)
    freqs = 1.0 / config.rope_theta ** (even_channels / hd)
    s = config.rope_scaling
    if s:
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        low = s["low_freq_factor"]
        high = s["high_freq_factor"]
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * freqs / s["factor"] + smooth * freqs
        slowed = torch.where(wavelen > old_len / low, freqs / s["factor"], blended)  # long waves
        freqs = torch.where(wavelen < old_len / high, freqs, slowed)  # short waves: kept
    return freqs


def rope_angles(config: ModelConfig, positions: torch.Tensor):
    """cos and sin of position·θ_i, shaped (..., seq, head_dim/2). Cheap, so computed per call."""
    angles = positions.float()[..., None] * rope_frequencies(config, positions.device)
    return angles.cos(), angles.sin()


def apply_rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by the angle position·θ_i:

        x'[2i]   = x[2i]·cos − x[2i+1]·sin
        x'[2i+1] = x[2i]·sin + x[2i+1]·cos

    so the dot product q·k depends only on the distance between the two positions.
    x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim/2) or (batch, seq, head_dim/2).
    """
    if cos.dim() == 3:  # per-row positions (packed sequences): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so decoding one new token costs
    one token's work instead of re-running the whole prefix."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype=torch.float32):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k/v of one layer; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Causal self-attention with grouped queries: n_heads query heads share n_kv_heads key/value
    heads (Llama-3: 32 query heads, 8 kv heads), which shrinks the KV cache n_heads/n_kv_heads
    times."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which slot of the KV cache is ours
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_embedding(q, cos, sin), apply_rotary_embedding(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # softmax(q·kᵀ/√head_dim + mask)·v; with no mask given, the plain causal mask (lets
        # SDPA pick its flash kernel). enable_gqa lets each kv head serve its group without a copy.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down( silu(gate(x)) ⊙ up(x) ). The gate learns which features to let through."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: normalise, transform, add back to the stream."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.tie_head()
        # recompute each block in backward instead of storing its activations
        self.grad_checkpointing = False
        self.compiled = False  # fused_loss.compile_for_training sets it (--compile)

    def tie_head(self):
        """Make lm_head use the embedding matrix itself (config.tie_embeddings). Called again by
        whatever replaces the embedding's Parameter object (load_state_dict(assign=True),
        to_empty), which would otherwise leave the head holding the old one."""
        self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random weights for models built without a checkpoint (tests, the demo, bench.py)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=std, generator=generator)

    def hidden_states(self, tokens, positions=None, doc_ids=None, cache: KVCache | None = None):
        """The final-normed residual stream, (batch, seq, dim): everything but the output head.

        positions: (seq,) or (batch, seq) token positions, default 0..seq-1 (after the cache).
        doc_ids:   (batch, seq) for packed rows: tokens attend only within their own document.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        mask = None
        if doc_ids is not None:  # block-diagonal causal mask: same document and not in the future
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
            mask = mask[:, None]  # (batch, 1, seq, seq), broadcast over heads
        elif cache is not None and T > 1:  # prefill after a prefix: query i sees keys ≤ start+i
            all_keys = torch.ones(T, start + T, dtype=torch.bool, device=tokens.device)
            mask = all_keys.tril(diagonal=start)
        elif cache is not None:  # one new token sees every cached key
            mask = torch.ones(1, start + 1, dtype=torch.bool, device=tokens.device)
        cos, sin = rope_angles(self.config, positions)
        x = self.embed_tokens(tokens)
        for block in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(self, tokens, positions=None, doc_ids=None, cache: KVCache | None = None):
        """Logits (batch, seq, vocab) for every position."""
        return self.lm_head(self.hidden_states(tokens, positions, doc_ids, cache))

    def loss(self, tokens, labels, positions=None, doc_ids=None):
        """Sum of next-token cross-entropies over target tokens (labels != IGNORE_INDEX).

        It returns the *sum*, not the mean: the training loop divides by the number of target
        tokens of the whole accumulated batch (train_sft.py: train_step). The same sum without
        ever holding the (batch·seq × vocab) logits is speed/fused_loss.py's chunked_loss, which
        the training step picks for large vocabularies (--loss-chunk).
        """
        h = self.hidden_states(tokens, positions, doc_ids)
        logits = self.lm_head(h).float()  # (batch, seq, vocab), in float32 for an exact softmax
        targets = next_token_targets(labels)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
