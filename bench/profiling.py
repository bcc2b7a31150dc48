"""Where one training step's time and memory go: what `bench/bench.py --profile` prints.

Time: every kernel of one step, summed by class (matrix products, attention, the elementwise work
around them, the optimizer, copies), set against the matmul ceiling of this GPU: one large bf16
product of the model's own shape, timed alone. From it, a bound:

    tokens/s ≤ ceiling / (matmul FLOPs executed per token)

what the step would reach if every product ran at the ceiling and nothing else took any time.

Memory: the tensors alive at the step's peak, grouped by the line of code that allocated them
(the first frame outside torch), on top of what was allocated before the step began (weights,
optimizer state).
"""
import time

import torch

# (class, substrings of kernel or operator names), first match wins: attention before matmul,
# because some attention kernels are CUTLASS kernels too
KERNEL_CLASSES = [
    ("attention", ("flash", "fmha", "sdpa", "attention", "scaled_dot_product")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::_scaled_mm")),  # (_scaled_mm: --fp8's products)
    ("optimizer and clipping", ("multi_tensor", "adam", "_foreach", "clip_grad")),
    ("communication", ("nccl", "all_reduce", "all_gather", "reduce_scatter")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "zero_", "catarray")),
]
OTHER = "elementwise and reductions"  # norms, RoPE, SwiGLU, the loss, NF4 dequantisation


def kernel_class(name: str) -> str:
    name = name.lower()
    if name.startswith("triton_"):  # torch.compile's fused kernels, named after what they fuse
        return OTHER  # (a "_to_copy" among them is a cast fused into other work, not a copy)
    for kind, patterns in KERNEL_CLASSES:
        if any(p in name for p in patterns):
            return kind
    return OTHER


def kernel_times(prof) -> dict[str, float]:
    """Microseconds by kernel name: GPU kernels when there are any, else CPU operators' own
    time (a CPU run, where the operators are the kernels)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.name]
    # (annotations such as "Optimizer.step#AdamW.step" span kernels: they are not kernels)
    totals: dict[str, float] = {}
    for e in kernels:
        totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    if not kernels:
        for e in prof.events():
            if e.name.startswith("aten::"):
                totals[e.name] = totals.get(e.name, 0.0) + e.self_cpu_time_total
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def time_by_class(times: dict[str, float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, us in times.items():
        kind = kernel_class(name)
        totals[kind] = totals.get(kind, 0.0) + us
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def matmul_flops_per_token(c, method: str, grad_ckpt: bool, matmul_params: int) -> float:
    """Matmul FLOPs the step executes per token (not the MFU convention: recomputation counts).
    Forward 2N, input gradients 2N, weight gradients 2N (full fine-tuning only), and with
    --grad-ckpt the blocks' forward once more; attention's two products, 4·L·d·s/2 causal,
    are the attention kernels' and not counted here. LoRA's own small products are left out."""
    head = c.dim * c.vocab_size
    flops = (6 if method == "full" else 4) * matmul_params
    if grad_ckpt:
        flops += 2 * (matmul_params - head)
    return flops


def matmul_ceiling(c, tokens: int, device: str, dtype=torch.bfloat16, repeats: int = 20) -> float:
    """FLOP/s of the model's largest projection, (tokens × dim) @ (dim × ffn_hidden) in `dtype`,
    timed alone: what this GPU reaches on this shape."""
    x = torch.randn(tokens, c.dim, device=device, dtype=dtype)
    w = torch.randn(c.ffn_hidden, c.dim, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        x @ w.t()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        x @ w.t()
    sync()
    return 2 * tokens * c.dim * c.ffn_hidden * repeats / (time.perf_counter() - t0)


def time_report(times: dict, wall_s: float, tokens: int, flops_per_token: float,
                ceiling: float, top: int = 12) -> list[str]:
    by_class = time_by_class(times)
    busy = sum(by_class.values()) / 1e6
    lines = [f"one step: {wall_s * 1e3:.1f} ms wall, kernels {busy * 1e3:.1f} ms "
             f"({busy / wall_s:.0%} of the wall time)"]
    for kind, us in by_class.items():
        rate = ""
        if kind == "matmul" and us > 0:
            rate = f"  {tokens * flops_per_token / (us / 1e6) / 1e12:.3g} TFLOP/s"
        lines.append(f"  {kind:<28}{us / 1e3:9.1f} ms {us / 1e6 / busy:6.1%}{rate}")
    bound = ceiling / flops_per_token
    lines.append(f"matmul ceiling (largest projection alone): {ceiling / 1e12:.3g} TFLOP/s; "
                 f"bound if every product ran at it and nothing else: {bound:,.0f} tokens/s "
                 f"(measured: {tokens / wall_s:,.0f})")
    lines.append(f"the {top} costliest kernels:")
    for name, us in list(times.items())[:top]:
        lines.append(f"  {us / 1e3:7.1f} ms  {kernel_class(name):<28}{name[:90]}")
    return lines


def peak_allocations(snapshot: dict, before: int, top: int = 12) -> list[str]:
    """From torch.cuda.memory._snapshot() taken after one recorded step: the live tensors at the
    step's peak by the line that allocated them. `before`: bytes allocated when recording began."""
    events = [e for trace in snapshot["device_traces"] for e in trace
              if e["action"] in ("alloc", "free_completed")]
    live, current, peak, peak_at = {}, before, before, -1
    for i, e in enumerate(events):  # first pass: when is the peak?
        current += e["size"] if e["action"] == "alloc" else -e["size"]
        if current > peak:
            peak, peak_at = current, i
    for e in events[: peak_at + 1]:  # second pass: what is alive then
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)
    by_origin: dict[str, int] = {}
    for e in live.values():
        origin = allocation_origin(e.get("frames", []))
        by_origin[origin] = by_origin.get(origin, 0) + e["size"]
    lines = [f"memory at the step's peak: {peak / 2**30:.2f} GiB",
             f"  {'allocated before the step (weights, optimizer state)':<60}"
             f"{before / 2**30:7.2f} GiB"]
    ranked = sorted(by_origin.items(), key=lambda kv: -kv[1])
    for origin, size in ranked[:top]:
        lines.append(f"  {origin:<60}{size / 2**30:7.2f} GiB")
    rest = sum(size for _, size in ranked[top:])
    if rest:
        lines.append(f"  {'the rest':<60}{rest / 2**30:7.2f} GiB")
    return lines


def allocation_origin(frames: list[dict]) -> str:
    """'file.py:line function' of the first Python frame outside torch, the standard library and
    torch.compile's generated code (whose caller, the compiled block, is named instead)."""
    for f in frames:
        name = f.get("filename", "")
        standard_library = "/lib/python3" in name and "-packages/" not in name
        generated = "torchinductor" in name
        if not name.endswith(".py") or "/torch/" in name or standard_library or generated:
            continue
        return f"{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "inside torch (no Python frame of ours)"
