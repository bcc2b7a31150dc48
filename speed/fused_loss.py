"""The fast paths beside the model: what --loss-chunk and --compile do.

The model's own loss (model.Transformer.loss) computes the logits of every position, (batch·seq ×
vocab) numbers, then their cross-entropy. For a 128k vocabulary at batch 8 × 2048 the float32
logits alone are 8 GiB, and autograd keeps them (and their gradient) for the backward pass.
`chunked_loss` gives the same sum and the same gradients, a chunk of positions at a time, and
never keeps a chunk's logits; the training step picks it (train_sft.py: batch_loss).
`compile_for_training` hands the blocks and the chunk loss to
torch.compile, which fuses their elementwise work into fewer kernels.
"""
import functools

import torch
from torch._functorch import config as partitioner_config

from model import IGNORE_INDEX, next_token_targets


def chunked_loss(model, tokens, labels, positions=None, doc_ids=None, chunk_size: int = 1024):
    """model.loss(tokens, labels, ...) computed chunk_size positions at a time: the same sum and
    the same gradients. Only for a plain nn.Linear head (a head with a LoRA adapter takes
    model.loss)."""
    h = model.hidden_states(tokens, positions, doc_ids)
    return chunked_cross_entropy(h, model.lm_head.weight, next_token_targets(labels), chunk_size,
                                 model.compiled)


def chunked_cross_entropy(h, weight, targets, chunk_size: int, compiled: bool = False):
    """Σ cross-entropy(h · weightᵀ, targets) over (batch, seq) positions, chunk_size at a
    time."""
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    step = compiled_loss_and_grad() if compiled else loss_and_grad
    return LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), chunk_size,
                                    need_grad, step)


def loss_and_grad(logits, targets):
    """For one chunk: Σ cross-entropy, and its gradient w.r.t. the logits, softmax − onehot
    (zero on ignored positions), in the logits' dtype: the next matmuls take it in that dtype.
    Plain elementwise work in float32: compile_for_training fuses it into two passes over the
    logits."""
    dtype = logits.dtype
    logits = logits.float()
    valid = (targets != IGNORE_INDEX)[:, None]
    safe = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = ((lse - logits.gather(1, safe)) * valid).sum()
    # the one-hot as a comparison, not a scatter into the softmax: all of it is elementwise, and
    # compiled, the chunk's float32 buffers at the memory peak went from two to one (Llama-3.2-1B:
    # 0.49 GiB less). In place, for the eager run: fewer chunk-sized temporaries.
    onehot = torch.arange(logits.shape[1], device=logits.device) == safe
    grad = (logits - lse).exp_().sub_(onehot.float()).mul_(valid)
    return loss, grad.to(dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(h·Wᵀ, targets), a chunk of positions at a time, gradients included.

    The loss is the last operation of the network, so its gradient is known the moment the
    logits are: d loss/d logits = softmax − onehot. For each chunk we compute the logits, the
    loss, that gradient, and pass it straight on through the head
    (grad_h = g·W, grad_W += gᵀ·h); then the chunk's logits are dropped. Backward only scales
    the stored gradients: no logits are kept for it and none are recomputed (what
    torch.utils.checkpoint would do).

    grad_W is summed in the weight's dtype: float32 for float32 master weights; for bf16 weights
    (--pure-bf16) in bf16, each chunk's product added by the matmul itself (addmm_: float32
    inside the product, one bf16 rounding a chunk), which spares a float32 copy of the head.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, need_grad, loss_and_grad):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        w = weight.to(dtype)  # under autocast: the bf16 copy of the head, made once
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None
        if need_grad and weight.requires_grad:  # summed in the weight's own dtype (see below)
            grad_w = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(device, enabled=False):
            for i in range(0, h.shape[0], chunk_size):
                hc = h[i:i + chunk_size].to(dtype)
                loss, g = loss_and_grad(hc @ w.t(), targets[i:i + chunk_size])
                total += loss
                if grad_h is not None:
                    grad_h[i:i + chunk_size] = g @ w
                    if grad_w is not None and grad_w.dtype == dtype:  # bf16 weights
                        grad_w.addmm_(g.t(), hc)  # the product adds itself: no temporary
                    elif grad_w is not None:  # float32 master weights: a float32 sum
                        grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # scaled in place: each buffer is used once, and a scaled copy would be another gradient
        # of the output head in memory, at the step's peak
        grad_h, grad_w = ctx.saved_tensors
        grad_h.mul_(grad_total.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_total)
        return grad_h, grad_w, None, None, None, None


@functools.cache
def compiled_loss_and_grad():
    """loss_and_grad compiled once: the float32 upcast, log-softmax and gradient fused into two
    passes over the chunk's logits, instead of one kernel (and one tensor) per operation."""
    return torch.compile(loss_and_grad)


# What train_sft.py says when it compiles (--compile)
COMPILE_NOTE = ("compile: the first steps compile each block and the loss (a one-time cost, "
                "seconds to a minute; --no-compile skips it)")
# When compiling pays on a GPU (train_sft.py's default, compile_pays): past this many tokens ×
# parameters. Measured on an H200 (SmolLM2-135M LoRA, Alpaca's lengths, CUDA graphs, a cold
# compile cache): compiling took 46 s more warm-up and 38,913 → 62,728 tokens/s, 9.8 µs less per
# token, so it paid after 4.7M tokens (46 s / 9.8 µs); 6M × 135M parameters, with margin. A larger
# model gains more per token for about the same one-time cost (one block is compiled), so its
# threshold in tokens is lower in proportion to its size.
COMPILE_PAYS_AFTER = 6e6 * 135e6


def compile_pays(model, batches, say) -> bool:
    """--compile left out on a GPU: compile when the run trains on enough tokens to win back the
    one-time cost (COMPILE_PAYS_AFTER), and say which way it went and why."""
    epoch_tokens = sum(int(batch["lengths"].sum()) for batch in batches.batches)
    tokens = epoch_tokens * batches.total_steps * batches.per_step / batches.per_epoch
    parameters = sum(p.numel() for p in model.parameters())
    pays = tokens * parameters >= COMPILE_PAYS_AFTER
    enough = f"{COMPILE_PAYS_AFTER / parameters / 1e6:.1f}M"
    if pays:
        say(f"compile: on, the run's {tokens / 1e6:.1f}M tokens win back its one-time cost (the "
            "first steps compile each block and the loss, about a minute; --no-compile skips it)")
    else:
        say(f"compile: off, the run's {tokens / 1e6:.2f}M tokens would not win back its one-time "
            f"cost (about a minute; it pays from about {enough} tokens of this model: --compile "
            "compiles anyway)")
    return pays


# What a compiled block may keep for its backward pass, as a share of what it would keep by
# default. Under 1, torch.compile's partitioner recomputes in the backward pass the tensors that
# cost the fewest FLOPs to recompute until it fits: the elementwise ones (silu(gate)·up, the
# RMSNorm outputs, RoPE), never a matmul. Measured on an H100 (docs/performance.md): at 0.8,
# llama-3.2-1b full fine-tuning 8×2048 needs 21.53 GiB instead of 28.53 at 0.3% fewer tokens/s,
# llama-3-8b LoRA 2×2048 28.38 instead of 34.93 at 1.6% fewer.
ACTIVATION_MEMORY_BUDGET = 0.8


def compile_for_training(model, mode: str | None = None, dynamic: bool | None = None):
    """torch.compile each block's forward for training (one graph, reused by every layer, so it
    compiles quickly) and the chunk loss. Hooks around a block (FSDP's gathers under torchrun)
    stay outside the compiled graph. Generation with a KV cache runs the blocks eagerly: each
    layer writes its own slice of the cache, which would make the compiled block recompile for
    every layer (and flood the log with recompile warnings) just to print a sample. So does the
    held-out loss (training_only).

    The compiled backward also recomputes what is cheap to recompute instead of storing it:
    see ACTIVATION_MEMORY_BUDGET. `mode` and `dynamic` are torch.compile's (bench.py's
    --compile-mode, --compile-dynamic)."""
    # (a setting of torch.compile's partitioner: for every graph compiled after it)
    partitioner_config.activation_memory_budget = ACTIVATION_MEMORY_BUDGET
    for block in model.layers:
        compiled = torch.compile(block.forward, mode=mode, dynamic=dynamic)
        block.forward = training_only(compiled, block.forward)
    model.compiled = True
    # float32 matmuls (LoRA in fp32) on tensor cores, as compile advises
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def training_only(compiled, eager):
    """The compiled block where gradients are computed; elsewhere (generation, the held-out loss
    under no_grad) the eager one: a graph without gradients would be a second compilation, which
    a few evaluations do not win back."""
    def forward(x, cos, sin, mask=None, cache=None):
        if cache is not None or not torch.is_grad_enabled():
            return eager(x, cos, sin, mask, cache)
        return compiled(x, cos, sin, mask)
    return forward
