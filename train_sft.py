"""Supervised fine-tuning of a LLaMA-family model, in one loop you can read.

    python train_sft.py                                    # built-in demo: tiny model, no downloads
    python train_sft.py --checkpoint DIR --data alpaca.json   # the real thing (LoRA by default)
    torchrun --nproc_per_node=2 train_sft.py ...              # the same on 2 GPUs (FSDP2: distributed.py)

One optimizer step:
    for each of --grad-accum micro-batches:
        loss = Σ cross-entropy over target tokens / (target tokens of the WHOLE accumulated batch)
        loss.backward()                      # gradients add up across micro-batches
    clip the gradient norm, AdamW step, learning rate from warmup + cosine.

Dividing by the whole batch's target-token count makes 4 micro-batches of 2 examples give
exactly the gradient of one batch of 8 (each token weighs the same, whichever micro-batch it
fell in); dividing each micro-batch by its own count would not.
"""
import argparse
import builtins
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
from batching import batch_efficiency, make_batches
from checkpoint import atomic_write, load_checkpoint, save_checkpoint
from errors import UserError, run_cli
from generate import generate
from lora import apply_lora, count_parameters, export_hf, export_peft, merge_lora, parse_targets, save_adapter
from model import IGNORE_INDEX, ModelConfig, Transformer
from quant import quantize_model
from run_dir import drop_metrics_after, load_state, log_metrics, plot_losses, prepare_out, save_state
from tokenizer import ByteTokenizer, checkpoint_tokenizer

ROOT = Path(__file__).resolve().parent
DEMO_DATA = ROOT / "examples" / "alpaca_demo.json"
# The classic Alpaca-LoRA recipe (tloen/alpaca-lora): r=16, alpha=32 (here), lr 3e-4, 3 epochs,
# cut-off 512 tokens, effective batch 128 = micro-batch 4 × 32 accumulation steps.
RECIPE = dict(method="lora", lr=3e-4, epochs=3, seq_len=512, batch_size=4, grad_accum=32, warmup_steps=100,
              eval_every=200, save_every=200)
# The demo trains a small random model from scratch on examples/alpaca_demo.json in about a minute
# on a laptop CPU: it shows the whole pipeline, not a useful model.
DEMO = dict(method="full", lr=2e-3, epochs=40, seq_len=256, batch_size=8, grad_accum=1, warmup_steps=10,
            eval_every=50, save_every=100)
DEMO_CONFIG = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=352, vocab_size=ByteTokenizer.vocab_size,
                          max_seq_len=256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", help="pretrained checkpoint (HF dir, Meta dir, llama2.c .bin/.pt, .gguf). Omitted: the built-in demo")
    a("--tokenizer", help="tokenizer.model (default: found next to --checkpoint)")
    a("--data", help=f"training data: Alpaca JSON/JSONL or chat JSONL (default: {DEMO_DATA.relative_to(ROOT)})")
    a("--val-data", help="separate validation file (default: --val-split of --data)")
    a("--val-split", type=float, default=0.05, help="fraction of --data held out for validation (default 0.05)")
    a("--template", default=None, help="prompt template: alpaca, llama2-chat, llama3-chat, none (default alpaca)")
    a("--train-on-prompt", action="store_true", help="also train on prompt tokens (no loss mask), for comparison")
    a("--out", default="out", help="output directory (default: out)")
    a("--method", choices=["lora", "qlora", "full"],
      help="LoRA adapters (default), QLoRA (LoRA on a 4-bit NF4 base: quant.py) or full fine-tuning")
    a("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    a("--lora-alpha", type=float, default=32, help="LoRA alpha; the update is scaled by alpha/r (default 32)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    a("--lora-targets", default="q,k,v,o,gate,up,down", help="layers to adapt: any of q,k,v,o,gate,up,down,head, or all")
    a("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    a("--dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    a("--seq-len", type=int, help="max tokens per example; longer ones are truncated (default 512)")
    a("--batch-size", type=int, help="examples per micro-batch (default 4)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 32: effective batch 128)")
    a("--lr", type=float, help="peak learning rate (default 3e-4)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices, never on norms (default 0)")
    a("--warmup-steps", type=int, help="linear warmup steps before the cosine decay (default 100)")
    a("--epochs", type=float, help="passes over the training data (default 3)")
    a("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (default 1.0; 0 = off)")
    a("--eval-every", type=int, help="validation loss + a sample every N steps (default 200)")
    a("--save-every", type=int, help="checkpoint every N steps (default 200)")
    a("--sample-prompt", help="instruction for the sample shown at each evaluation (default: first validation record)")
    a("--seed", type=int, default=42)
    a("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs that have it, else fp16; fp32 on CPU")
    a("--grad-ckpt", action="store_true", help="activation checkpointing: recompute each block in backward (less memory)")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--loss-chunk", type=int, default=1024, help="positions per chunk of the output-head loss (0 = all at once; default 1024)")
    a("--packing", action="store_true", help="pack several examples per row (with document masking) instead of padding")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--merge", action="store_true", help="at the end also write the merged model (ours and Hugging Face format)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.demo = args.checkpoint is None
    for key, value in (DEMO if args.demo else RECIPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data = args.data or (str(DEMO_DATA) if args.demo else None)
    if not args.data:
        p.error("--data is required with --checkpoint")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # 0 would divide by zero or train nothing
            p.error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    args.template = args.template or "alpaca"
    args.precision = args.precision or default_precision(args.device)
    return args


def start_distributed():
    """A distributed.Distributed when torchrun started this process (it sets RANK and WORLD_SIZE),
    else None. distributed.py is imported only then."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    from distributed import Distributed
    return Distributed()


def default_precision(device: str) -> str:
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def build_model(args):
    """(model, tokenizer). LoRA keeps the frozen base in bf16/fp16 (half the memory of fp32), QLoRA
    in NF4 (a quarter of that); trainable weights (LoRA matrices, or everything for full
    fine-tuning) stay float32."""
    low = autocast_dtype(args.precision)
    base_dtype = torch.float32 if args.method == "full" or low is None else low
    if args.demo:
        tokenizer = ByteTokenizer()
        torch.manual_seed(args.seed)
        model = Transformer(DEMO_CONFIG).to(args.device)
        model.init_weights()
        if args.method == "qlora":
            quantize_model(model, compute_dtype=base_dtype)
    else:
        model, _ = load_checkpoint(args.checkpoint, device=args.device, dtype=base_dtype,
                                   quantize=args.method == "qlora")
        tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    if args.method in ("lora", "qlora"):
        torch.manual_seed(args.seed)
        apply_lora(model, parse_targets(args.lora_targets), r=args.lora_r, alpha=args.lora_alpha,
                   dropout=args.lora_dropout, rslora=args.rslora, dora=args.dora)
    model.grad_checkpointing = args.grad_ckpt
    return model, tokenizer


def make_optimizer(model, lr, weight_decay, device):
    """AdamW. Weight decay (if any) only on matrices: it pulls weights toward 0, which for LoRA's
    A and B means toward the pretrained model, a sensible pull; norm gains belong near 1, not 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=str(device).startswith("cuda"))


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup from 0 to `peak`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def count_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # position t predicts labels[t+1]


def batch_loss(model, batch, device, precision, loss_chunk=0):
    """model.loss of one batch (Σ cross-entropy over its target tokens), under autocast at `precision`.
    Only the model's inputs go to the device: "lengths" is for the log."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "positions", "doc_ids")
              if batch.get(k) is not None}
    amp = autocast_dtype(precision)
    with torch.autocast(device_type=torch.device(device).type, dtype=amp, enabled=amp is not None):
        return model.loss(inputs["tokens"], inputs["labels"], inputs.get("positions"), inputs.get("doc_ids"),
                          chunk_size=loss_chunk)


def train_step(model, optimizer, micro_batches, device, precision, scaler=None, grad_clip=1.0, loss_chunk=0,
               n_targets=None, reduce=None, ranks=1):
    """One optimizer step over the accumulated micro-batches: (mean loss per target token, grad norm).
    Under torchrun, micro_batches are this rank's share of the step, n_targets counts the targets
    of all ranks' micro-batches, reduce sums a number over the ranks, and `ranks` undoes FSDP's
    averaging of gradients (we want their sum: each loss is already divided by all ranks' targets)."""
    if n_targets is None:
        n_targets = sum(count_targets(b) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = batch_loss(model, b, device, precision, loss_chunk) / max(n_targets, 1)
        (scaler.scale(loss * ranks) if scaler else loss * ranks).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # DTensor under FSDP
    loss_value = reduce(float(total)) if reduce else float(total)  # every rank decides alike below
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm
    if scaler:
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed, and lowers the scale
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


@torch.no_grad()
def evaluate(model, batches, device, precision, loss_chunk=0) -> float:
    """Mean cross-entropy per target token over the validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        total += float(batch_loss(model, b, device, precision, loss_chunk))
        count += count_targets(b)
    model.train(was_training)
    return total / max(count, 1)


def estimate_memory(model, args) -> dict:
    """Rough GiB the run needs: weights + gradients + AdamW moments + activations + logits."""
    gib = 2 ** 30
    c = model.config
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / gib
    trainable, _ = count_parameters(model)
    grads, adam = trainable * 4 / gib, trainable * 8 / gib  # float32 grads; two float32 moments
    tokens = args.batch_size * args.seq_len
    act_bytes = 2 if args.precision != "fp32" else 4
    # Saved for backward per token and layer: ~8 d-wide tensors (norm outputs, q/k/v/attention
    # output, residuals) and ~4 ffn-wide ones (gate, up, silu, product); with checkpointing only
    # each block's input survives (plus one block's worth during its recomputation).
    per_layer = tokens * (8 * c.dim + 4 * c.ffn_hidden) * act_bytes
    activations = (tokens * c.dim * act_bytes * c.n_layers + per_layer if args.grad_ckpt else per_layer * c.n_layers) / gib
    logit_rows = min(tokens, args.loss_chunk) if args.loss_chunk else tokens
    logits = logit_rows * c.vocab_size * (4 + 4 + act_bytes) / gib  # fp32 logits, their grad, the matmul output
    est = dict(weights=weights, gradients=grads, optimizer=adam, activations=activations, logits=logits)
    est["total"] = sum(est.values())
    return est


def print_memory(est, device):
    line = ", ".join(f"{k} {v:.2f}" for k, v in est.items() if k != "total")
    have = ""
    if str(device).startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        have = f"; this GPU has {total / 2**30:.1f} GiB ({free / 2**30:.1f} free)"
    print(f"memory estimate: {est['total']:.2f} GiB = {line}{have}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    # ── torchrun: data parallel with FSDP2 (distributed.py). Without torchrun, dist is None and
    # nothing below changes: every `if dist` line is the whole distributed part of the loop.
    dist = start_distributed()
    if dist:
        args.device = dist.device
    args.world_size = dist.world if dist else 1
    main_rank = dist is None or dist.is_main
    print = builtins.print if main_rank else (lambda *a, **k: None)  # one rank speaks
    if args.demo:
        print("demo: no --checkpoint, so a tiny random model is trained from scratch on "
              f"{Path(args.data).name}.\n      For a real run: python train_sft.py --checkpoint DIR --data alpaca.json "
              "(README: 'Run it for real')")
    print("config: " + json.dumps(vars(args)))
    out = prepare_out(args, write=main_rank)
    torch.manual_seed(args.seed)
    model, tokenizer = build_model(args)
    trainable, total = count_parameters(model)
    print(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable ({100 * trainable / total:.2f}%) [{args.method}]")
    if dist:
        dist.shard(model)
        torch.manual_seed(args.seed + dist.rank)  # each rank its own dropout masks
    if args.compile:
        model.compile_for_training()

    # ---- data: records → (input_ids, labels) → batches
    seq_len = min(args.seq_len, model.config.max_seq_len)
    records = data.load_records(args.data)
    if args.val_data:
        train_records, val_records = records, data.load_records(args.val_data)
    else:
        train_records, val_records = data.split_train_val(records, args.val_split, seed=args.seed)
    template = data.get_template(args.template)
    train_ex, stats = data.encode_dataset(train_records, tokenizer, template, seq_len, args.train_on_prompt, source=args.data)
    val_ex = data.encode_dataset(val_records, tokenizer, template, seq_len, args.train_on_prompt, source=args.val_data or args.data)[0] if val_records else []
    print(f"data: {stats['records']} training records → {stats['kept']} kept, {stats['truncated']} truncated, "
          f"{stats['dropped']} dropped; {len(val_ex)} validation examples")
    pad_id = tokenizer.eos_id

    @functools.lru_cache(maxsize=2)
    def batches_of(epoch):  # each epoch has its own shuffle, fixed by (seed, epoch)
        return make_batches(train_ex, args.batch_size, pad_id=pad_id, max_seq_len=seq_len,
                                 packing=args.packing, seed=args.seed, epoch=epoch)
    n_micro = len(batches_of(0))
    val_batches = make_batches(val_ex, args.batch_size, pad_id=pad_id, max_seq_len=seq_len,
                                    packing=args.packing, shuffle=False) if val_ex else []
    per_step = args.grad_accum * args.world_size  # micro-batches per optimizer step, all ranks together
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * n_micro / per_step))
    print(f"batches: {n_micro} micro-batches per epoch, {total_steps} optimizer steps "
          f"(batch {args.batch_size} × accumulation {args.grad_accum} × {args.world_size} ranks), "
          f"{100 * batch_efficiency(batches_of(0)):.1f}% of batch tokens are real")
    print_memory(estimate_memory(model, argparse.Namespace(**{**vars(args), "seq_len": seq_len})), args.device)

    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.device)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    step = load_state(out, model, optimizer, scaler, dist) if args.resume else 0
    if args.resume and main_rank:
        drop_metrics_after(out, step)
    # The sample shown at each evaluation: a held-out prompt, except in the demo, whose tiny model
    # can only memorise, so there it answers a training prompt.
    sample_prompt = args.sample_prompt or (val_records[0] if val_records and not args.demo else train_records[0])
    model.train()

    def micro_batches_for(step):
        """The micro-batches of optimizer step `step`: a pure function of the step, so resuming is exact."""
        first = step * per_step
        return [batches_of(i // n_micro)[i % n_micro] for i in range(first, first + per_step)]

    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, disable=None if main_rank else True)
    try:
        while step < total_steps:
            lr = lr_at(step, args.lr, args.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = micro_batches_for(step)
            mine = micro[dist.rank::dist.world] if dist else micro  # this rank's share of the step
            t_step = time.perf_counter()
            try:
                loss, grad_norm = train_step(model, optimizer, mine, args.device, args.precision, scaler,
                                             args.grad_clip, args.loss_chunk, n_targets=sum(map(count_targets, micro)),
                                             reduce=dist.sum if dist else None,
                                             ranks=args.world_size)
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"out of GPU memory at step {step + 1} with --batch-size {args.batch_size} × "
                                f"--seq-len {seq_len}: lower --batch-size (raise --grad-accum to keep the "
                                "effective batch), or add --grad-ckpt") from None
            if not math.isfinite(loss):
                hint = " (fp16 overflows easily: try --precision bf16 or fp32)" if args.precision == "fp16" else \
                       " (try a lower --lr)"
                saved = f"The last good checkpoint is in {out}" if (out / "checkpoint.pt").exists() else \
                        f"No checkpoint was saved before it (--save-every {args.save_every})"
                raise UserError(f"loss is {loss} at step {step + 1}; stopped before updating the weights{hint}. {saved}")
            step += 1
            real_tokens = sum(int(b["lengths"].sum()) for b in micro)  # padding not counted
            tok_s = real_tokens / max(time.perf_counter() - t_step, 1e-9)  # the step alone, not evals or saves
            mem = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
            if main_rank:
                log_metrics(out, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tok_s),
                                  "peak_mem_gib": round(mem, 2)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mem=f"{mem:.1f}G")
            bar.update(1)
            if val_batches and (step % args.eval_every == 0 or step == total_steps):
                val_loss = evaluate(model, val_batches, args.device, args.precision, args.loss_chunk)
                sample = show_sample(model, tokenizer, template, sample_prompt)
                val_ppl = math.exp(min(val_loss, 50))
                if main_rank:
                    log_metrics(out, {"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
                    bar.write(f"step {step}: val loss {val_loss:.4f} (perplexity {val_ppl:.2f})\n  sample: {sample!r}")
            if step % args.save_every == 0 and step < total_steps:
                save_state(out, model, optimizer, scaler, step, dist)
    except KeyboardInterrupt:
        bar.close()
        save_state(out, model, optimizer, scaler, step, dist)
        print(f"\ninterrupted: saved step {step} to {out / 'checkpoint.pt'}; continue with the same command plus --resume",
              file=sys.stderr)
        sys.exit(130)
    bar.close()
    save_state(out, model, optimizer, scaler, step, dist)
    if dist:  # rank 0 writes the results from a plain (unsharded) copy of the trained model
        trained, _ = dist.training_state(model, optimizer)
        dist.close()
        if main_rank:
            model, _ = build_model(argparse.Namespace(**{**vars(args), "device": "cpu"}))
            model.load_state_dict(trained, strict=False)
            finish(args, out, model, tokenizer)
        dist.exit()
    finish(args, out, model, tokenizer)


def show_sample(model, tokenizer, template, prompt, max_new_tokens=48) -> str:
    ids = data.encode_prompt(prompt, tokenizer, template)
    return tokenizer.decode(list(generate(model, tokenizer, ids, max_new_tokens, temperature=0.0)))


def finish(args, out: Path, model, tokenizer):
    """Write what the user came for: the adapter (LoRA) or the model (full), optionally merged/exported.
    Model directories get the tokenizer file too, so `generate.py --checkpoint` finds it there."""
    if args.method in ("lora", "qlora"):
        save_adapter(model, out / "adapter", base_id={"checkpoint": args.checkpoint})
        export_peft(model, out / "peft", base_model_name_or_path=str(args.checkpoint or "demo"))
        print(f"saved the adapter to {out / 'adapter'} (and in PEFT's layout to {out / 'peft'})")
        if args.merge:
            merge_lora(model)
    if args.method == "full" or args.merge:
        save_checkpoint(model, out / "model")
        copy_tokenizer(tokenizer, out / "model")
        print(f"saved the model to {out / 'model'} (load it with --checkpoint {out / 'model'})")
    if args.merge:
        ckpt = None if args.demo else Path(args.checkpoint)
        export_hf(model, out / "hf", tokenizer_dir=ckpt if ckpt and ckpt.is_dir() else None)  # + HF tokenizer configs
        copy_tokenizer(tokenizer, out / "hf")
        print(f"saved a Hugging Face checkpoint to {out / 'hf'}")
    plot_losses(out)


def copy_tokenizer(tokenizer, directory: Path):
    """The tokenizer file the run used, as `tokenizer.model` (the name every loader looks for)."""
    if not isinstance(tokenizer, ByteTokenizer) and not (directory / "tokenizer.model").exists():
        atomic_write(directory / "tokenizer.model", lambda tmp: shutil.copyfile(tokenizer.path, tmp))


if __name__ == "__main__":
    run_cli(main)
