"""How much GPU memory a training run needs: estimated before it starts, measured after.

    weights      every parameter and buffer on the GPU (bf16 base: 2 bytes a parameter; NF4:
                 about 0.52; QLoRA keeps an untied embedding in CPU memory)
    gradients    one per trainable weight (LoRA: only the adapters)
    optimizer    AdamW's two moments per trainable weight (in bf16 with --adamw-state bf16)
    activations  what the forward pass keeps for the backward pass; --grad-ckpt keeps only each
                 block's input and recomputes the rest
    logits       one --loss-chunk of (positions × vocabulary) logits and their gradient

Checked against the measured peaks of bench/bench.py's rows on an H100 (README: Performance).
"""
import torch

from lora import lora_layers


def estimate_memory(model, config) -> dict:
    """Rough GiB a training run needs on the GPU, by kind: the weights; a gradient and two AdamW
    moments for each trainable weight; the activations kept for the backward pass; the logits of
    one loss chunk, on each GPU. `config` gives method, batch_size, seq_len, precision, grad_ckpt,
    loss_chunk, compile, adamw_state and world_size (torchrun: full fine-tuning shards weights and
    AdamW state)."""
    c = model.config
    device = model.norm.weight.device  # (QLoRA's embedding may be in CPU memory: not counted)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                  if t.device == device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    tokens = config.batch_size * config.seq_len
    act_bytes = 2 if config.precision != "fp32" else 4
    # Saved for backward per token and layer: ~8 d-wide tensors (norm outputs, q/k/v/attention
    # output, residuals) and ~4 ffn-wide ones (gate, up, silu, product). Compiled blocks
    # (--compile) recompute the elementwise ones (fused_loss.ACTIVATION_MEMORY_BUDGET) and keep
    # ~4 d-wide, k and v, and gate and up.
    per_layer = tokens * (8 * c.dim + 4 * c.ffn_hidden) * act_bytes
    if config.compile:
        kv_dim = c.n_kv_heads * c.head_dim
        per_layer = tokens * (4 * c.dim + 2 * kv_dim + 2 * c.ffn_hidden) * act_bytes
    # LoRA with dropout: each adapter keeps its own dropped copy of its input and the mask (a byte).
    per_layer += tokens * sum(m.base.in_features for m in lora_layers(model).values()
                              if m.dropout > 0) * (act_bytes + 1) // c.n_layers
    # --grad-ckpt: only each block's input survives, plus one block during its recomputation
    if config.grad_ckpt:
        activations = tokens * c.dim * act_bytes * c.n_layers + per_layer
    else:
        activations = per_layer * c.n_layers
    if config.precision != "fp32":  # autocast's 16-bit copy of each float32 matrix, for backward
        float32_matrices = [p for p in trainable if p.dim() >= 2 and p.element_size() == 4]
        activations += sum(p.numel() * act_bytes for p in float32_matrices)
    logit_rows = min(tokens, config.loss_chunk) if config.loss_chunk else tokens
    # float32 logits, their gradient, and the matmul's output in the compute dtype
    logits = logit_rows * c.vocab_size * (4 + 4 + act_bytes)
    moments = 2 * trainable_bytes  # AdamW's two, in the weights' dtype, or bf16 (--adamw-state)
    if config.adamw_state == "bf16":
        moments = 2 * 2 * sum(p.numel() for p in trainable)
    shards = config.world_size if config.method == "full" else 1  # FSDP: 1/world of each, a rank
    estimate = dict(weights=weights / shards, gradients=trainable_bytes / shards,
                    optimizer=moments / shards, activations=activations, logits=logits)
    estimate = {kind: size / 2**30 for kind, size in estimate.items()}
    estimate["total"] = sum(estimate.values())
    return estimate


def memory_line(estimate: dict, device: str) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in estimate.items() if k != "total")
    have = ""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        have = f"; this GPU has {total / 2**30:.1f} GiB ({free / 2**30:.1f} free)"
    return f"memory estimate: {estimate['total']:.2f} GiB = {parts}{have}"


def peak_gib(config) -> float | None:
    """The GPU's peak allocated memory so far (None on a CPU, where nothing measures it alone)."""
    if not config.device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def peak_memory_line(estimate: dict, device: str) -> str:
    if not device.startswith("cuda"):
        return f"memory: estimated {estimate['total']:.2f} GiB (measured only on a GPU)"
    measured = torch.cuda.max_memory_allocated() / 2**30
    return f"memory: estimated {estimate['total']:.2f} GiB, measured peak {measured:.2f} GiB"
