"""Supervised fine-tuning of a LLaMA-family model, in one loop you can read.

    python train_sft.py                                       # the demo: a tiny model, no downloads
    python train_sft.py --checkpoint DIR --data alpaca.json   # the real thing (LoRA by default)
    torchrun --nproc_per_node=2 train_sft.py ...              # the same on 2 GPUs (distributed.py)

One optimizer step:
    for each of --grad-accum micro-batches:
        loss = Σ cross-entropy over target tokens / (target tokens of the WHOLE accumulated batch)
        loss.backward()                      # gradients add up across micro-batches
    clip the gradient norm, AdamW step, learning rate from warmup + cosine.

Dividing by the whole batch's target-token count makes 4 micro-batches of 2 examples give
exactly the gradient of one batch of 8 (each token weighs the same, whichever micro-batch it
fell in); dividing each micro-batch by its own count would not.
"""
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import data
from batching import StepBatches, batch_efficiency, make_batches
from checkpoint import load_checkpoint, save_checkpoint
from config import DEMO_CONFIG, TrainConfig, parse_args
from errors import UserError, run_cli
from generate import generate
from lora import apply_lora, count_parameters, merge_lora, parse_targets, save_adapter
from memory import estimate_memory, memory_line, peak_gib, peak_memory_line
from model import IGNORE_INDEX, PRECISIONS, Transformer
from records import load_records, split_train_val
from run_dir import (drop_metrics_after, load_state, log_metrics, plot_losses, prepare_out,
                     record_effective, save_state)
from tokenizer import ByteTokenizer, check_vocabulary, checkpoint_tokenizer


def main(argv=None):
    config = parse_args(argv, description=__doc__)
    dist = start_distributed()  # torchrun: data parallel (distributed.py); otherwise None
    if dist:
        config = replace(config, device=dist.device, world_size=dist.world)
    if dist and config.adamw_state == "bf16":  # (optim.py does not handle FSDP's sharded weights)
        raise UserError("--adamw-state bf16 runs in one process, not under torchrun")
    log = Log(quiet=dist is not None and not dist.is_main)  # one rank speaks
    out = prepare_out(config, write=log.speaks)  # refuses an --out that holds anything else
    stop_on_sigterm()
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, log)
    given = config
    config, batches, validation = load_data(config, tokenizer, model, log)
    if log.speaks:
        record_effective(out, given, config)  # what load_data had to change, beside what was given
    if dist:
        dist.parallelize(model, shard=config.method == "full")
        torch.manual_seed(config.seed + dist.rank)  # each rank its own dropout masks
    if config.compile:  # beside the model: torch.compile of each block and of the chunked loss
        from fused_loss import compile_for_training
        compile_for_training(model)
    memory = estimate_memory(model, replace(config, seq_len=batches.longest))
    log.say(memory_line(memory, config.device))
    optimizer = make_optimizer(model, config.lr, config.weight_decay, config.device,
                               config.adamw_state)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    step = load_state(out, model, optimizer, scaler, dist) if config.resume else 0
    if config.resume and log.speaks:
        drop_metrics_after(out, step)
    train(model, optimizer, scaler, batches, validation, config, out, log, step, dist)
    log.say(peak_memory_line(memory, config.device))
    if dist:  # rank 0 writes the results from an unsharded copy; the other ranks get None
        model = dist.gather_model(model, optimizer, build=lambda: build_model(
            replace(config, device="cpu"), Log(quiet=True))[0])
    if model is not None:
        finish(config, out, model, tokenizer)
    if dist:
        dist.exit()


def train(model, optimizer, scaler, batches, validation, config, out, log, step, dist=None):
    """The loop: one optimizer step per iteration; a checkpoint and an evaluation every so often."""
    total = batches.total_steps
    if validation and step == 0:  # where training starts from, to compare the evaluations with
        log.evaluation(0, *validation.run(model, config), out)
    log.start(total, step)
    model.train()
    try:
        while step < total:
            lr = lr_at(step, config.lr, config.warmup_steps, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = batches.for_step(step)
            n_targets = sum(count_targets(b) for b in micro)  # the loss is a mean over these
            real_tokens = sum(int(b["lengths"].sum()) for b in micro)  # for tokens/s: no padding
            if dist:  # this rank's part of the step (and its divisor: see Distributed.share)
                micro, n_targets = dist.share(micro, n_targets)
            started = time.perf_counter()
            sync = dist.gradient_sync if dist else None
            loss, grad_norm = train_step(model, optimizer, micro, n_targets, config, scaler, sync)
            seconds = time.perf_counter() - started  # the step alone, not evaluations or saves
            if dist:
                loss = dist.mean(loss)
            diverged = not math.isfinite(loss) or (scaler is None and not math.isfinite(grad_norm))
            if diverged:  # (fp16's loss scaling skips an overflowing step by itself: not an error)
                raise UserError(nan_message(loss, grad_norm, step, config, out))
            step += 1
            log.step({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(real_tokens / max(seconds, 1e-9)),
                      "peak_mem_gib": peak_gib(config)}, out)
            if step % config.save_every == 0 or step == total:  # before evaluating: nothing lost
                save_state(out, model, optimizer, scaler, step, dist)
            if validation and (step % config.eval_every == 0 or step == total):
                log.evaluation(step, *validation.run(model, config), out)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (stop_on_sigterm): save, say how to go on
        log.close()
        save_state(out, model, optimizer, scaler, step, dist)
        print(f"\ninterrupted: saved step {step} to {out / 'checkpoint.pt'}; continue with the "
              "same command plus --resume", file=sys.stderr)
        sys.exit(130)
    log.close()


def train_step(model, optimizer, micro_batches, n_targets, config, scaler=None, sync=None):
    """One optimizer step over the accumulated micro-batches: (mean loss per target, grad norm).
    n_targets counts the target tokens of the whole step. (Under torchrun: see Distributed.share,
    and `sync` averages the ranks' gradients when FSDP does not.)"""
    total = 0.0
    for batch in micro_batches:
        loss_sum = batch_loss(model, batch, config.device, config.precision, config.loss_chunk)
        loss = loss_sum / max(n_targets, 1)
        (scaler.scale(loss) if scaler else loss).backward()  # gradients add up over micro-batches
        total += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if sync:
        sync(params)
    if scaler:
        scaler.unscale_(optimizer)  # the true gradients, for clipping
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm).item())  # over all ranks
    if scaler:
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed, and lowers the scale
        scaler.update()
    elif math.isfinite(grad_norm):  # a NaN/inf gradient (a NaN loss) must not reach the weights
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), grad_norm


def batch_loss(model, batch, device, precision, loss_chunk=0):
    """model.loss of one batch (Σ cross-entropy over its target tokens), under autocast at
    `precision`. Only the model's inputs go to the device: "lengths" is for the log."""
    inputs = {k: batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None
              for k in ("tokens", "labels", "positions", "doc_ids")}
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision],
                              enabled=precision != "fp32")  # fp32: no autocast, all in float32
    with autocast:
        return model.loss(inputs["tokens"], inputs["labels"], inputs["positions"],
                          inputs["doc_ids"], chunk_size=loss_chunk)


def count_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # position t predicts labels[t+1]


@torch.no_grad()
def evaluate(model, batches, device, precision, loss_chunk=0) -> float:
    """Mean cross-entropy per target token over the validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(batch_loss(model, batch, device, precision, loss_chunk))
        count += count_targets(batch)
    model.train(was_training)
    return total / max(count, 1)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup from 0 to `peak`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, device, adamw_state="fp32"):
    """AdamW. Weight decay (if any) only on matrices: it pulls weights toward 0, which for LoRA's
    A and B means toward the pretrained model, a sensible pull; norm gains belong near 1, not 0.
    adamw_state "bf16": the moments stored in bf16 (optim.py, --adamw-state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if adamw_state == "bf16":
        from optim import AdamWBf16State
        return AdamWBf16State(groups, lr=lr, betas=(0.9, 0.999))
    fused = str(device).startswith("cuda")  # one kernel for all parameters on a GPU
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


# -- Setting up: the model, the data --------------------------------------------------------------

def build_model(config: TrainConfig, log):
    """(model, tokenizer). LoRA keeps the frozen base in bf16/fp16 (half the memory of fp32), QLoRA
    in NF4 (a quarter of that); trainable weights (LoRA matrices, or everything for full
    fine-tuning) stay float32."""
    if config.method == "full":  # the trained weights: float32 master weights, or bf16 throughout
        base_dtype = torch.bfloat16 if config.pure_bf16 else torch.float32
    else:  # the frozen base: in the compute precision (QLoRA: NF4, computing in that precision)
        base_dtype = PRECISIONS[config.precision]
    if config.checkpoint is None:
        tokenizer = ByteTokenizer()
        torch.manual_seed(config.seed)
        model = Transformer(DEMO_CONFIG).to(config.device)
        model.init_weights()  # (in float32, then rounded once to the weights' dtype)
        model.to(base_dtype)
        if config.method == "qlora":
            from quant import quantize_model
            quantize_model(model, compute_dtype=base_dtype)
    else:
        tokenizer = checkpoint_tokenizer(config.checkpoint, config.tokenizer)  # cheap, so first
        model, _ = load_checkpoint(config.checkpoint, device=config.device, dtype=base_dtype,
                                   quantize=config.method == "qlora")
        check_vocabulary(tokenizer, model.config.vocab_size)
    if config.method == "qlora":  # the frozen embedding need not take GPU memory
        from quant import embedding_to_host
        embedding_to_host(model)
    if config.method in ("lora", "qlora"):
        torch.manual_seed(config.seed)
        lora = config.lora
        apply_lora(model, parse_targets(lora.targets), r=lora.r, alpha=lora.alpha,
                   dropout=lora.dropout, rslora=lora.rslora, dora=lora.dora)
    model.grad_checkpointing = config.grad_ckpt
    trainable, total = count_parameters(model)
    log.say(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
            f"({100 * trainable / total:.2f}%) [{config.method}]")
    return model, tokenizer


def load_data(config: TrainConfig, tokenizer, model, log):
    """Records → (input_ids, labels) → the batches of every step. Returns the config (with what
    had to change: a --seq-len past the model's context, a warmup longer than the run), the step
    batches, and the Validation of each evaluation (None without validation data)."""
    context = model.config.max_seq_len
    if config.seq_len > context:
        log.say(f"note: --seq-len {config.seq_len} is longer than the model's context; "
                f"using {context}")
        config = replace(config, seq_len=context)
    records = load_records(config.data)
    if config.val_data:
        train_records, val_records = records, load_records(config.val_data)
    else:
        train_records, val_records = split_train_val(records, config.val_split, seed=config.seed)
    template = data.get_template(config.template)
    train_examples, stats = data.encode_dataset(train_records, tokenizer, template, config.seq_len,
                                                config.train_on_prompt, source=config.data)
    val_examples = []
    if val_records:
        val_examples, _ = data.encode_dataset(val_records, tokenizer, template, config.seq_len,
                                              config.train_on_prompt,
                                              source=config.val_data or config.data)
    log.say(f"data: {stats['records']} training records → {stats['kept']} kept, "
            f"{stats['truncated']} truncated, {stats['dropped']} dropped; "
            f"{len(val_examples)} validation examples")
    options = dict(pad_id=tokenizer.eos_id, max_seq_len=config.seq_len, packing=config.packing)
    per_step = config.grad_accum * config.world_size  # micro-batches per optimizer step, all ranks
    batches = StepBatches(train_examples, config.batch_size, per_step, seed=config.seed, **options)
    batches.total_steps = config.max_steps or max(1, math.ceil(config.epochs * batches.per_epoch
                                                               / per_step))
    log.say(f"batches: {batches.per_epoch} micro-batches per epoch, {batches.total_steps} "
            f"optimizer steps (batch {config.batch_size} × accumulation {config.grad_accum} × "
            f"{config.world_size} ranks), {100 * batch_efficiency(batches.batches):.1f}% of batch "
            "tokens are real")
    if config.warmup_steps >= batches.total_steps:  # the peak learning rate would never be reached
        warmup = max(1, batches.total_steps // 10)
        log.say(f"note: --warmup-steps {config.warmup_steps} is not shorter than the run "
                f"({batches.total_steps} steps); warming up for {warmup} steps (10%) instead")
        config = replace(config, warmup_steps=warmup)
    if not val_examples:
        return config, batches, None
    # The prompt answered at each evaluation: a held-out one, except in the demo, whose tiny model
    # can only memorise, so there it answers a training prompt.
    prompt = config.sample_prompt
    if prompt is None:
        prompt = train_records[0] if config.checkpoint is None else val_records[0]
    val_batches = make_batches(val_examples, config.batch_size, shuffle=False, **options)
    return config, batches, Validation(val_batches, tokenizer, template, prompt)


@dataclass
class Validation:
    """What each evaluation looks at: the held-out batches, and one prompt answered greedily."""
    batches: list
    tokenizer: object
    template: object
    prompt: object  # an instruction (str) or a record

    def run(self, model, config) -> tuple[float, str]:
        """(mean held-out loss per target token, the model's answer to the prompt)."""
        loss = evaluate(model, self.batches, config.device, config.precision, config.loss_chunk)
        ids = data.encode_prompt(self.prompt, self.tokenizer, self.template)
        answer = generate(model, self.tokenizer, ids, max_new_tokens=48, temperature=0.0)
        return loss, self.tokenizer.decode(list(answer))


# -- Finishing: what the user came for ------------------------------------------------------------

def finish(config: TrainConfig, out: Path, model, tokenizer):
    """Write the adapter (LoRA) or the model (full), and with --merge the merged model in our
    format and Hugging Face's. Model directories get the tokenizer too, so
    `generate.py --checkpoint` finds it there."""
    if config.method in ("lora", "qlora"):
        from export import export_peft, peft_base_note, peft_base_path
        save_adapter(model, out / "adapter", base_id={"checkpoint": config.checkpoint})
        export_peft(model, out / "peft", base_model_name_or_path=peft_base_path(config.checkpoint))
        print(f"saved the adapter to {out / 'adapter'} (in PEFT's layout: {out / 'peft'})"
              + peft_base_note(config.checkpoint, out))
        if config.merge:
            merge_lora(model)
    if config.method == "full" or config.merge:
        save_checkpoint(model, out / "model")
        tokenizer.save(out / "model")
        print(f"saved the model to {out / 'model'} (load it with --checkpoint {out / 'model'})")
    if config.merge:
        from export import export_hf
        export_hf(model, out / "hf", tokenizer, template_name=config.template)
        print(f"saved a Hugging Face checkpoint to {out / 'hf'}")
    plot_losses(out)


# -- Around the loop ------------------------------------------------------------------------------

def start_distributed():
    """A distributed.Distributed when torchrun started this process (it sets RANK and WORLD_SIZE),
    else None. distributed.py is imported only then."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    from distributed import Distributed
    return Distributed()


def stop_on_sigterm():
    """SIGTERM (`kill`, a cluster job's time limit) stops the run like Ctrl-C: save, then exit."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def nan_message(loss, grad_norm, step, config, out) -> str:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    hint = "try --precision bf16 or fp32" if config.precision == "fp16" else "try a lower --lr"
    if (out / "checkpoint.pt").exists():
        saved = f"The last good checkpoint is in {out}"
    else:
        saved = f"No checkpoint was saved before it (--save-every {config.save_every})"
    return (f"{what} at step {step + 1}; stopped before updating the weights ({hint}). "
            f"{saved}")


# -- What the user sees ---------------------------------------------------------------------------

class Log:
    """Console output and metrics.jsonl. On a terminal a progress bar; in a file or a pipe (nohup,
    a cluster job) a plain line every 1/20 of the run instead. Quiet on torchrun's other ranks."""

    def __init__(self, quiet=False):
        self.speaks = not quiet
        self.bar = None

    def say(self, text: str):
        if self.speaks:
            print(text, flush=True)

    def start(self, total: int, done: int):
        self.total = total
        self.every = max(1, total // 20)
        if self.speaks and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=done, desc="train", dynamic_ncols=True)

    def step(self, row: dict, out: Path):
        if not self.speaks:
            return
        log_metrics(out, row)
        text = f"loss {row['loss']:.4f}, lr {row['lr']:.2e}, {row['tokens_per_s']:,} tok/s"
        if row["peak_mem_gib"] is not None:
            text += f", {row['peak_mem_gib']:.1f} GiB"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif row["step"] % self.every == 0 or row["step"] == self.total:
            self.say(f"step {row['step']}/{self.total}: {text}")

    def evaluation(self, step: int, val_loss: float, sample: str, out: Path):
        if self.speaks:
            perplexity = math.exp(min(val_loss, 50))  # e^loss: as unsure as a choice among so many
            log_metrics(out, {"step": step, "val_loss": val_loss, "val_ppl": perplexity})
            text = f"step {step}: val loss {val_loss:.4f} (perplexity {perplexity:.2f})"
            self.write(f"{text}\n  sample: {sample!r}")

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.say(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


if __name__ == "__main__":
    run_cli(main)
