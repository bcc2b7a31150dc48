"""Training throughput of this project on a public model shape, as one JSON line.

    python -m bench --shape llama-3.2-1b --method lora --batch-size 8 --seq-len 2048
    python -m bench --shape tiny --device cpu --steps 2      # a CPU smoke test (from the root)
    python -m bench --shape smollm2-135m --lengths bench/alpaca_1k_smollm2_lengths.json \
        --grad-accum 4 --cuda-graphs                          # Alpaca's real lengths

The same measurement as bench/peer_hf_peft.py (Hugging Face transformers + PEFT): same
shapes, flags and JSON fields, random weights (speed does not depend on the values). It runs the
training step of train_sft.py itself (make_optimizer + train_step), not a special fast path.
Rows are --seq-len tokens each, or with --lengths the examples of a file of real lengths
(bench/alpaca_lengths.py), random token ids, batched as train_sft.py batches them: tokens/s then
counts the real tokens, not the padding.

FLOPs per token for MFU (causal attention, recomputation not counted), as in the peer harness:
    full: 6·N + 6·L·d·s      lora: 4·N + 6·L·d·s   (frozen weights get no weight-gradient)
with N the parameters of all matmuls (output head included, embedding lookup excluded).
"""
import json
import sys
import time
from pathlib import Path

import torch

from batching import StepBatches, batch_efficiency
from errors import (ArgumentParser, UserError, default_device, device_name, fraction_below_one,
                    non_negative_int, positive_int, run_cli)
from speed.fused_loss import compile_for_training
from lora import HF_TARGET_NAMES, apply_lora, count_parameters, parse_targets
from run.memory import estimate_memory
from model import (DEFAULT_PRECISION, IGNORE_INDEX, PRECISIONS, PRESETS, ModelConfig, Transformer,
                   default_precision)
from projections import PROJECTIONS, is_target, replace_module
from speed.quant import DEFAULT_TARGETS, NF4Linear, embedding_to_host
from run.processes import start_processes
from train_sft import (TrainConfig, batch_loss, count_targets, loss_scaler, make_optimizer,
                       train_step)

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM, by the datasheet


def matmul_params(c: ModelConfig) -> int:
    attn = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
    return c.n_layers * (attn + 3 * c.dim * c.ffn_hidden) + c.dim * c.vocab_size


def build(c: ModelConfig, method: str, device: str, base_dtype: torch.dtype,
          pure_bf16: bool = False) -> Transformer:
    """A random model straight on the device: frozen base weights in `base_dtype` (LoRA), in NF4
    (QLoRA), or float32 master weights (full fine-tuning; bf16 with pure_bf16), as train_sft.py
    keeps them."""
    previous = torch.get_default_dtype()
    full_dtype = torch.bfloat16 if pure_bf16 else torch.float32
    torch.set_default_dtype(full_dtype if method == "full" else base_dtype)
    try:  # QLoRA starts on the meta device: a 16-bit 70B model would not fit on the GPU
        with torch.device("meta" if method == "qlora" else device):
            model = Transformer(c)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device).manual_seed(0)
    if method == "qlora":
        for name, module in list(model.named_modules()):  # one 16-bit matrix at a time, then NF4
            if is_target(name, DEFAULT_TARGETS):
                w = torch.empty(module.weight.shape, device=device, dtype=base_dtype)
                w.normal_(0, 0.02, generator=g)
                replace_module(model, name, NF4Linear.from_weight(w, compute_dtype=base_dtype))
        for module in model.modules():  # embedding, norms, head: real (uninitialised) memory
            if not isinstance(module, NF4Linear):
                module.to_empty(device=device, recurse=False)
        if c.tie_embeddings:
            model.tie_head()
    model.init_weights(generator=g)
    if method == "qlora":  # as train_sft.build_model does
        embedding_to_host(model)
    return model


def our_targets(spec: str) -> list[str]:
    """--lora-targets in the peer harness's Hugging Face names ('q_proj,v_proj', 'lm_head') or
    in ours ('q,v', 'head', 'all') -> our short names."""
    short_name = {hf_name: short for short, hf_name in HF_TARGET_NAMES.items()}
    names = [name.strip() for name in spec.split(",")]
    return parse_targets(",".join(short_name.get(name, name) for name in names))


def length_batches(a, vocab_size: int) -> StepBatches:
    """--lengths: each [tokens, prompt, answer] of the file becomes an example of random ids,
    labels on its answer alone; batched (grouped by length, or packed) as train_sft.py does."""
    try:
        spec = json.loads(Path(a.lengths).read_text())["examples"]
        examples = []
        g = torch.Generator().manual_seed(0)
        for n, prompt, answer in spec:
            ids = torch.randint(0, vocab_size, (n,), generator=g).tolist()
            trained = ids[prompt:prompt + answer]
            labels = [IGNORE_INDEX] * prompt + trained + [IGNORE_INDEX] * (n - prompt - answer)
            examples.append((ids, labels))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--lengths {a.lengths}: not a lengths file of bench/alpaca_lengths.py "
                        f"({e})") from None
    if max(len(ids) for ids, _ in examples) > a.seq_len:
        raise UserError(f"--lengths {a.lengths}: an example is longer than --seq-len {a.seq_len}")
    return StepBatches(lambda epoch: examples, a.batch_size, a.grad_accum, pad_id=0,
                       max_seq_len=a.seq_len, packing=a.packing,
                       pad_to_multiple_of=a.pad_to_multiple_of, seed=0)


def first_of_each_shape(batches: list[dict]) -> list[dict]:
    shapes = {}
    for batch in batches:
        shapes.setdefault((tuple(batch["tokens"].shape), batch["doc_ids"] is not None), batch)
    return list(shapes.values())


def lengths_fields(a, batches, warmup_s: float) -> dict:
    """The JSON fields of a --lengths run: its settings, the share of real tokens, the untimed
    warm-up (compiling, recording graphs)."""
    if batches is None:
        return {}
    return {"lengths": Path(a.lengths).name, "grad_accum": a.grad_accum, "packing": a.packing,
            "pad_to_multiple_of": a.pad_to_multiple_of, "cuda_graphs": a.cuda_graphs,
            "compile_mode": a.compile_mode if a.compile else None,
            "compile_dynamic": a.compile_dynamic,
            "real_token_share": round(batch_efficiency(batches.batches), 4),
            "warmup_s": round(warmup_s, 2)}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--shape", default="llama-3.2-1b", choices=sorted(PRESETS),
      help="a model shape of model.PRESETS, with random weights")
    a("--method", default="lora", choices=["lora", "qlora", "full"],
      help="what is trained: LoRA adapters, LoRA on an NF4 base, or every weight")
    a("--batch-size", type=positive_int, default=8, help="examples per step")
    a("--seq-len", type=positive_int,
      help="tokens per example (default: 2048, or the shape's context if shorter); with "
      "--lengths the longest row (default: 512, train_sft.py's)")
    a("--lengths", help="a JSON file of real example lengths (bench/alpaca_lengths.py): batches "
      "of those, grouped by length (or packed) as train_sft.py makes them (default: rows of "
      "--seq-len tokens)")
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--packing", action="store_true", help="with --lengths: pack examples into rows")
    a("--pad-to-multiple-of", type=positive_int, default=1,
      help="with --lengths: round each batch's width up to a multiple of this")
    a("--cuda-graphs", action="store_true",
      help="replay each micro-batch shape's recorded CUDA graph (speed/cuda_graphs.py)")
    a("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
      default="default", help="torch.compile's mode for --compile")
    a("--compile-dynamic", action="store_true", help="--compile with dynamic shapes from the "
      "first batch (default: torch's, static until a second shape comes)")
    a("--steps", type=positive_int, default=10, help="timed steps")
    a("--warmup", type=non_negative_int, default=3,
      help="untimed steps first (compilation, allocator); with --lengths also one untimed step "
      "per batch shape of the timed steps")
    a("--lora-r", type=positive_int, default=16, help="LoRA rank r (alpha is 2r)")
    a("--lora-targets", default=",".join(HF_TARGET_NAMES[short] for short in PROJECTIONS),
      help="HF-style names as in the peer harness, or ours (q,k,v,o,gate,up,down,head; all)")
    a("--grad-ckpt", action="store_true", help="activation checkpointing")
    a("--pure-bf16", action="store_true",
      help="full fine-tuning with bf16 weights and AdamW state, no float32 master copy")
    a("--adamw-state", choices=["fp32", "bf16"], default="fp32",
      help="full fine-tuning with float32 weights: AdamW's moments in fp32 or bf16 (optim.py)")
    a("--prompt-frac", type=fraction_below_one, default=0.3,
      help="share of each row masked as prompt (-100)")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--fp8", action="store_true",
      help="FP8 products for the seven projections (speed/fp8.py): LoRA's frozen base stored in "
           "FP8, full fine-tuning's weights cast to FP8 each step; a GPU of compute capability "
           ">= 8.9 (on a CPU torch emulates them: a smoke test)")
    a("--loss-chunk", type=non_negative_int, default=1024,
      help="positions per output-head chunk (0 = whole batch)")
    a("--precision", choices=["bf16", "fp16", "fp32"],
      help=f"the dtype the products run in, under autocast (default: {DEFAULT_PRECISION})")
    a("--device", type=device_name, default=default_device(), help="cpu, cuda, cuda:N or mps")
    a("--profile", action="store_true",
      help="after timing, print one step's kernel time by class against the matmul ceiling, and "
           "what is alive at its memory peak (bench/profiling.py), to stderr")
    return p.parse_args(argv)


def profile_step(step, c, a, sync, cuda):
    """One more step under torch.profiler (time by kernel class), then one with the CUDA
    allocator's history recorded (what is alive at the peak): bench/profiling.py."""
    from torch.profiler import ProfilerActivity, profile

    from bench import profiling
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t0
    tokens = a.batch_size * a.seq_len
    flops = profiling.matmul_flops_per_token(c, a.method, a.grad_ckpt, matmul_params(c))
    ceiling = profiling.matmul_ceiling(c, tokens, a.device)
    lines = profiling.time_report(profiling.kernel_times(prof), wall, tokens, flops, ceiling)
    print("\n".join(lines), file=sys.stderr)
    if cuda:  # (Python frames only: unwinding C++ stacks broke checkpointed compiled blocks)
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        try:
            step()
            sync()
        except SystemError as e:  # torch 2.11: recording breaks --grad-ckpt's compiled recompute
            print(f"memory at the step's peak: not recorded ({e})", file=sys.stderr)
            return
        finally:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
        print("\n".join(profiling.peak_allocations(snapshot, before)), file=sys.stderr)


def main(argv=None):
    a = parse_args(argv)

    processes = start_processes(a.device)  # torchrun: FSDP2 data parallel, as in train_sft.py
    a.device = processes.device
    world = processes.world

    if a.pure_bf16 and a.method != "full":
        raise UserError("--pure-bf16 is for --method full")
    if a.adamw_state == "bf16" and (a.method != "full" or a.pure_bf16 or world > 1):
        raise UserError("--adamw-state bf16 is for --method full with float32 weights, in one "
                        "process")
    c = ModelConfig.from_name(a.shape)
    if a.seq_len is None:  # a shape with a shorter context (tiny: 512) gets all of it
        a.seq_len = min(512 if a.lengths else 2048, c.max_seq_len)
    if a.seq_len > c.max_seq_len:
        raise UserError(f"--seq-len {a.seq_len} is longer than {a.shape}'s context "
                        f"({c.max_seq_len})")
    precision = a.precision or default_precision(a.device)
    low = PRECISIONS[precision]
    model = build(c, a.method, a.device, low, a.pure_bf16)
    if a.fp8:  # before the adapters, as train_sft.build_model does
        from speed.fp8 import check_fp8, use_fp8
        if world > 1:
            raise UserError("--fp8 runs in one process, not under torchrun")
        check_fp8(a.method, precision, a.device, allow_cpu=True)
        use_fp8(model, a.method, say=lambda line: print(line, file=sys.stderr))
    if a.method in ("lora", "qlora"):
        apply_lora(model, our_targets(a.lora_targets), r=a.lora_r, alpha=2 * a.lora_r, dropout=0.0)
    model.grad_checkpointing = a.grad_ckpt
    trainable, _ = count_parameters(model)  # (before sharding)
    settings = TrainConfig(method=a.method, batch_size=a.batch_size, seq_len=a.seq_len,
                           device=a.device, precision=precision, grad_ckpt=a.grad_ckpt,
                           loss_chunk=a.loss_chunk, compile=a.compile,
                           adamw_state=a.adamw_state, world_size=world)
    # what train_sft.py prints before training
    estimate = estimate_memory(model, settings)["total"]
    processes.parallelize(model, shard=a.method == "full")
    if a.compile:
        compile_for_training(model, mode=None if a.compile_mode == "default" else a.compile_mode,
                             dynamic=a.compile_dynamic or None)
    if a.cuda_graphs:
        from speed.cuda_graphs import cuda_graphs_refusal, use_cuda_graphs
        refusal = cuda_graphs_refusal(settings)
        if refusal:
            raise UserError(f"--cuda-graphs needs {refusal}")
        use_cuda_graphs(model, lambda m, batch: batch_loss(m, batch, a.device, precision,
                                                           a.loss_chunk))
    model.train()
    optimizer = make_optimizer(model, 1e-4, 0.0, a.device, a.adamw_state)
    scaler = loss_scaler(settings)

    B, S = a.batch_size, a.seq_len
    if a.lengths:
        batches = length_batches(a, c.vocab_size)
        step_batches = batches.for_step
    else:
        g = torch.Generator(a.device).manual_seed(processes.rank)  # each rank its own batch
        tokens = torch.randint(0, c.vocab_size, (B, S), device=a.device, generator=g)
        labels = tokens.clone()
        labels[:, : int(S * a.prompt_frac)] = IGNORE_INDEX
        batch = {"tokens": tokens, "labels": labels, "positions": None, "doc_ids": None,
                 "lengths": torch.full((B,), S)}
        step_batches = lambda i: [batch] * a.grad_accum  # noqa: E731

    def step(i, micro=None):
        micro = micro or step_batches(i)
        n_targets = sum(count_targets(b) for b in micro)  # per rank: see Distributed.share
        loss = train_step(model, optimizer, micro, n_targets, settings, scaler, processes)[0]
        return processes.mean(loss)

    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for i in range(a.warmup):
        step(i)
    # the timed steps' micro-batches, made before the clock starts
    timed = [step_batches(i) for i in range(a.warmup, a.warmup + a.steps)]
    if a.lengths:  # every batch shape once before timing: compiling and recording come first
        for micro in first_of_each_shape([batch for micro in timed for batch in micro]):
            step(None, [micro])
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    real_tokens = sum(int(batch["lengths"].sum()) for micro in timed for batch in micro)
    losses = []
    t0 = time.perf_counter()
    for micro in timed:
        losses.append(step(None, micro))
    sync()
    dt = time.perf_counter() - t0

    if a.profile:
        profile_step(lambda: step(None, timed[-1]), c, a, sync, cuda)

    tok_s = real_tokens * world / dt  # all GPUs together
    loss = sum(losses) / len(losses)
    if a.lengths:  # attention's FLOPs grow with the length: the examples' mean
        examples = batches.examples_of(0)
        S = sum(len(ids) for ids, _ in examples) / len(examples)
    per_tok = (6 if a.method == "full" else 4) * matmul_params(c) + 6 * c.n_layers * c.dim * S
    processes.close()  # (torchrun: every rank finished measuring)
    if processes.is_main:
        lora_r = None if a.method == "full" else a.lora_r
        peak_mem_gib = None  # per GPU; nothing measures it on a CPU
        if cuda:
            peak_mem_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # the field names of the peer harness's JSON (its flag is --lora-rank)
        print(json.dumps({
            "impl": "sft-from-scratch", "shape": a.shape, "method": a.method, "batch_size": B,
            "seq_len": a.seq_len, "grad_ckpt": a.grad_ckpt, "lora_rank": lora_r,
            "tokens_per_s": round(tok_s), "step_s": round(dt / a.steps, 4),
            "peak_mem_gib": peak_mem_gib,
            "mfu_vs_989T": round(tok_s * per_tok / (H100_BF16_PEAK * world), 4),
            "world_size": world, "tokens_per_s_per_gpu": round(tok_s / world),
            "loss": round(float(loss), 4), "trainable_params": trainable,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "compile": a.compile, "loss_chunk": a.loss_chunk, "pure_bf16": a.pure_bf16,
            "adamw_state": a.adamw_state, "fp8": a.fp8,
            "estimate_gib": round(estimate, 2), **lengths_fields(a, batches if a.lengths else None,
                                                                 warmup_s),
            # (a graph's memory is its pool's, reserved at recording, not allocated at a replay)
            **({"cuda_graphs_failed": model.cuda_graphs.failed,
                "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}
               if a.cuda_graphs else {}),
        }), flush=True)
    processes.exit()


if __name__ == "__main__":
    run_cli(main)
