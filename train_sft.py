"""Supervised fine-tuning of a LLaMA-family model, in one loop you can read.

    python train_sft.py                                       # the demo: a tiny model, no downloads
    python train_sft.py --data alpaca.json                    # LoRA on SmolLM2-135M-Instruct
    python train_sft.py --checkpoint DIR --data alpaca.json   # LoRA on your model
    torchrun --nproc_per_node=2 train_sft.py ...              # on 2 GPUs: run/distributed.py

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
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import data
from batching import StepBatches, batch_efficiency, make_batches
from formats.checkpoint import load_checkpoint, save_checkpoint
from config import DEMO_CONFIG, TrainConfig, parse_args
from errors import UserError, run_cli
from formats.adapter import save_adapter
from lora import apply_lora, count_parameters, merge_lora, parse_targets
from run.best import keep_best
from run.memory import estimate_memory, memory_line, peak_gib, peak_memory_line
from model import IGNORE_INDEX, PRECISIONS, Transformer, next_token_targets
from neftune import add_neftune
from run.processes import ONE_PROCESS, start_processes
from run.run_dir import load_state, prepare_out, record_effective, undo_start
from run.run_metrics import Log, drop_metrics_after, plot_losses
from run.samples import Samples, make_samples
from run.stop import STOP
from run.training_run import TrainingRun
from sources import load_sources
import templates
from tokenizer import ByteTokenizer, check_vocabulary, checkpoint_tokenizer


@STOP.listening()  # Ctrl-C and SIGTERM while main runs (run/stop.py); the caller's handlers after
def main(argv=None):
    config = parse_args(argv, description=__doc__)
    processes = start_processes(config.device)  # one, or one per GPU under torchrun
    config = replace(config, device=processes.device, world_size=processes.world)
    if processes.world > 1 and config.adamw_state == "bf16":  # (speed/optim.py: not for FSDP)
        raise UserError("--adamw-state bf16 runs in one process, not under torchrun")
    if processes.world > 1 and config.fp8:  # (speed/fp8.py: not tried under FSDP yet)
        raise UserError("--fp8 runs in one process, not under torchrun")
    log = Log(quiet=not processes.is_main)  # one process speaks
    tokenizer = config_tokenizer(config)  # read once: the template and the model both need it
    config = resolve_template(config, tokenizer, log)
    # --out is checked (and locked) before the model loads: a mistake is said in a second, not
    # after minutes of loading an 8B model
    run = TrainingRun(prepare_out(config, write=log.speaks), log, processes)
    try:
        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer, log)
        if config.neftune_alpha:  # noise on the input embeddings while training (neftune.py)
            add_neftune(model, config.neftune_alpha)
        given = config
        config, train_data = load_data(config, tokenizer, model, log)
        if config.compile is None:  # a GPU's default: compile when the run wins the cost back
            from speed.fused_loss import compile_pays
            config = replace(config, compile=compile_pays(model, train_data.batches, log.say))
        if log.speaks:
            # what load_data changed, beside the given, and what each source gave
            record_effective(run.out, given, config, data_sources=train_data.sources)
        processes.parallelize(model, shard=config.method == "full")
        torch.manual_seed(config.seed + processes.rank)  # each process its own dropout masks
        if config.compile:  # beside the model: torch.compile of each block and of the chunked loss
            from speed.fused_loss import COMPILE_NOTE, compile_for_training
            compile_for_training(model)
            if given.compile:  # (compile_pays said it already)
                log.say(COMPILE_NOTE)
        if config.cuda_graphs:  # each batch shape's forward and backward recorded once, replayed
            from speed.cuda_graphs import use_cuda_graphs
            use_cuda_graphs(model, lambda m, batch: batch_loss(m, batch, config.device,
                                                               config.precision, config.loss_chunk))
        memory = estimate_memory(model, replace(config, seq_len=train_data.batches.longest))
        log.say(memory_line(memory, config.device))
        optimizer = make_optimizer(model, config.lr, config.weight_decay, config.device,
                                   config.adamw_state)
        scaler = loss_scaler(config)
        step = load_state(run.out, model, optimizer, scaler, processes) if config.resume else 0
        if config.resume and log.speaks:
            drop_metrics_after(run.out, step)
        # out/best/ at each lowest held-out loss, and --early-stop (run/best.py)
        run.best = keep_best(config, run.out, train_data.validation, step,
                             lambda directory: write_results(config, directory, model, tokenizer),
                             processes)
    except BaseException:  # the start failed: take back what prepare_out created
        if log.speaks:
            undo_start(run.out)
        raise
    train(model, optimizer, scaler, train_data, config, run, step)
    log.say(peak_memory_line(memory, config.device))
    # under torchrun, rank 0 writes the results from an unsharded copy; the other ranks get None
    model = processes.gather_model(model, optimizer, build=lambda: build_model(
        replace(config, device="cpu"), tokenizer, Log(quiet=True)))
    if model is not None:
        finish(config, run.out, model, tokenizer)
    processes.exit()


def loss_scaler(config: TrainConfig):
    """fp16's loss scaling (a GradScaler); for bf16 and fp32, one that does nothing."""
    return torch.amp.GradScaler(torch.device(config.device).type,
                                enabled=config.precision == "fp16")


NO_LOSS_SCALING = torch.amp.GradScaler("cpu", enabled=False)


def train(model, optimizer, scaler, train_data, config, run, step):
    """The loop: one optimizer step per iteration; a checkpoint and an evaluation every so often."""
    total = train_data.batches.total_steps
    if step == 0:  # where training starts from, for comparison
        run.evaluation(0, model, train_data, config)
    run.start(total, step)
    model.train()
    STOP.at_step_end = True
    try:
        while step < total:
            lr = lr_at(step, config.lr, config.warmup_steps, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = train_data.batches.for_step(step)
            n_targets = sum(count_targets(b) for b in micro)  # the loss is a mean over these
            real_tokens = sum(int(b["lengths"].sum()) for b in micro)  # for tokens/s: no padding
            micro, n_targets = run.processes.share(micro, n_targets)  # torchrun: this rank's part
            started = time.perf_counter()
            loss, grad_norm = train_step(model, optimizer, micro, n_targets, config, scaler,
                                         run.processes)
            seconds = time.perf_counter() - started  # the step alone, not evaluations or saves
            loss = run.processes.mean(loss)
            # (fp16's loss scaling skips an overflowing step by itself: not an error)
            if not math.isfinite(loss) or not (scaler.is_enabled() or math.isfinite(grad_norm)):
                raise UserError(nan_message(loss, grad_norm, step, config, run.out))
            step += 1
            run.step({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(real_tokens / max(seconds, 1e-9)),
                      "peak_mem_gib": peak_gib(config)})
            if step % config.save_every == 0 or step == total:  # before evaluating: nothing lost
                run.save(model, optimizer, scaler, step)
            if step % config.eval_every == 0 or step == total:
                if run.evaluation(step, model, train_data, config):
                    if run.saved_step != step:  # --early-stop ends the run here (run/best.py)
                        run.save(model, optimizer, scaler, step)
                    break
            if STOP.requested_by_any(run.processes):  # a signal came during this step, now whole
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (run/stop.py): save, say how to go on
        run.close()
        if run.saved_step != step:
            run.save(model, optimizer, scaler, step)
        print(f"\ninterrupted: saved step {step} to {run.out / 'checkpoint.pt'}; continue with "
              "the same command plus --resume", file=sys.stderr)
        sys.exit(130)
    finally:
        STOP.at_step_end = False  # from here on a signal stops at once
    run.close()


def train_step(model, optimizer, micro_batches, n_targets, config, scaler=NO_LOSS_SCALING,
               processes=ONE_PROCESS):
    """One optimizer step over the accumulated micro-batches: (mean loss per target, grad norm).
    n_targets counts the target tokens of the whole step. (Under torchrun: see Distributed.share
    and sync_gradients.) fp16 scales the loss up so that small gradients do not underflow to 0,
    and unscales the gradients before clipping; otherwise `scaler` does nothing."""
    total = 0.0
    graphs = getattr(model, "cuda_graphs", None)  # speed/cuda_graphs.py (--cuda-graphs)
    for batch in micro_batches:
        if graphs:  # the same forward and backward, replayed from the batch shape's CUDA graph
            total += graphs.run(batch, n_targets)
            continue
        loss_sum = batch_loss(model, batch, config.device, config.precision, config.loss_chunk)
        loss = loss_sum / max(n_targets, 1)
        scaler.scale(loss).backward()  # gradients add up over micro-batches
        total += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    processes.sync_gradients(params)
    scaler.unscale_(optimizer)  # (fp16) the true gradients, for clipping
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm).item())  # over all ranks
    # A NaN/inf gradient (a NaN loss) must not reach the weights; fp16's scaler skips such a step
    # itself, and lowers its scale
    if scaler.is_enabled() or math.isfinite(grad_norm):
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=graphs is None)  # (the graphs add into the same tensors)
    return float(total), grad_norm


def batch_loss(model, batch, device, precision, loss_chunk=0):
    """model.loss of one batch (Σ cross-entropy over its target tokens), under autocast at
    `precision`. Only the model's inputs go to the device: "lengths" is for the log."""
    inputs = {k: batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None
              for k in ("tokens", "labels", "positions", "doc_ids")}
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision],
                              enabled=precision != "fp32")  # fp32: no autocast, all in float32
    with autocast:
        if loss_chunk > 0 and type(model.lm_head) is torch.nn.Linear:
            # the same sum without the (batch·seq × vocab) logits: speed/fused_loss.py
            from speed.fused_loss import chunked_loss
            return chunked_loss(model, **inputs, chunk_size=loss_chunk)
        return model.loss(**inputs)


def count_targets(batch) -> int:
    return int((next_token_targets(batch["labels"]) != IGNORE_INDEX).sum())


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
    adamw_state "bf16": the moments stored in bf16 (speed/optim.py, --adamw-state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if adamw_state == "bf16":
        from speed.optim import AdamWBf16State
        return AdamWBf16State(groups, lr=lr, betas=(0.9, 0.999))
    fused = str(device).startswith("cuda")  # one kernel for all parameters on a GPU
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


# -- Setting up: the model, the data --------------------------------------------------------------

def build_model(config: TrainConfig, tokenizer, log):
    """The model, checked against its tokenizer. LoRA keeps the frozen base in bf16/fp16 (half
    the memory of fp32; FP8 with --fp8, half of that), QLoRA in NF4 (a quarter); trainable weights
    (LoRA matrices, or everything for full fine-tuning) stay float32."""
    if config.method == "full":  # the trained weights: float32 master weights, or bf16 throughout
        base_dtype = torch.bfloat16 if config.pure_bf16 else torch.float32
    else:  # the frozen base: in the compute precision (QLoRA: NF4, computing in that precision)
        base_dtype = PRECISIONS[config.precision]
    if config.checkpoint is None:
        torch.manual_seed(config.seed)
        model = Transformer(DEMO_CONFIG).to(config.device)
        model.init_weights()  # (in float32, then rounded once to the weights' dtype)
        model.to(base_dtype)
        if config.method == "qlora":
            from speed.quant import quantize_model
            quantize_model(model, compute_dtype=base_dtype)
    else:
        from formats.default_model import default_note
        note = default_note(config.checkpoint)  # None unless --checkpoint was left out
        if note:
            log.say(note)
        model, _ = load_checkpoint(config.checkpoint, device=config.device, dtype=base_dtype,
                                   quantize=config.method == "qlora")
        check_vocabulary(tokenizer, model.config.vocab_size)
    if config.fp8:  # the projections' products in FP8 (speed/fp8.py), before LoRA wraps them
        from speed.fp8 import use_fp8
        use_fp8(model, config.method, say=log.say)
    if config.method == "qlora":  # the frozen embedding need not take GPU memory
        from speed.quant import embedding_to_host
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
    return model


def config_tokenizer(config: TrainConfig):
    """The demo's byte tokenizer, or the checkpoint's (or --tokenizer's): cheap, so read first."""
    if config.checkpoint is None:
        return ByteTokenizer()
    return checkpoint_tokenizer(config.checkpoint, config.tokenizer)


def resolve_template(config: TrainConfig, tokenizer, log) -> TrainConfig:
    """--template auto → the checkpoint's own chat template, else alpaca (said in one line).
    config.json then records the template used, a name or the jinja source, so that --resume
    compares what was used and generate.py prompts the trained model as it was trained."""
    template = data.resolve_template(config.template, tokenizer, say=log.say)
    return replace(config, template=data.template_spec(template))


@dataclass
class TrainingData:
    """What the loop reads: the micro-batches of every step, and what each evaluation looks at:
    the held-out batches (None without validation data), the sample prompts (run/samples.py)."""
    batches: StepBatches
    validation: "Validation | None"
    samples: Samples
    sources: list[dict]  # what each --data gave (config.json: "data_sources")


def load_data(config: TrainConfig, tokenizer, model, log) -> tuple[TrainConfig, TrainingData]:
    """Records → (input_ids, labels) → the batches of every step. Returns the config (with what
    had to change: a --seq-len past the model's context, a warmup longer than the run) and the
    TrainingData."""
    context = model.config.max_seq_len
    if config.seq_len > context:
        log.say(f"note: --seq-len {config.seq_len} is longer than the model's context; "
                f"using {context}")
        config = replace(config, seq_len=context)
    template = templates.get_template(config.template)
    loaded = load_sources(config, tokenizer, template, log.say)  # each --data, split and encoded
    stats = loaded.stats
    log.say(f"data: {stats['records']} training records → {stats['kept']} kept, "
            f"{stats['truncated']} truncated, {stats['dropped']} dropped; "
            f"{len(loaded.val_examples)} validation examples")
    options = dict(pad_id=tokenizer.eos_id, max_seq_len=config.seq_len, packing=config.packing,
                   pad_to_multiple_of=config.pad_to_multiple_of)
    per_step = config.grad_accum * config.world_size  # micro-batches per optimizer step, all ranks
    batches = StepBatches(loaded.mix.epoch, config.batch_size, per_step, config.epochs,
                          config.max_steps, seed=config.seed, **options)
    log.say(f"batches: {batches.per_epoch} micro-batches per epoch, {batches.total_steps} "
            f"optimizer steps (batch {config.batch_size} × accumulation {config.grad_accum} × "
            f"{config.world_size} ranks), {100 * batch_efficiency(batches.batches):.1f}% of batch "
            "tokens are real")
    if config.warmup_steps >= batches.total_steps:  # the peak learning rate would never be reached
        warmup = max(1, batches.total_steps // 10)
        log.say(f"note: --warmup-steps {config.warmup_steps} is not shorter than the run "
                f"({batches.total_steps} steps); warming up for {warmup} steps (10%) instead")
        config = replace(config, warmup_steps=warmup)
    samples = make_samples(config, loaded.train_records, loaded.val_records, tokenizer, template,
                           log)
    if not loaded.val_examples:
        return config, TrainingData(batches, None, samples, loaded.described)
    val_batches = make_batches(loaded.val_examples, config.batch_size, shuffle=False, **options)
    return config, TrainingData(batches, Validation(val_batches), samples, loaded.described)


@dataclass
class Validation:
    """What each evaluation measures: the loss on the held-out batches."""
    batches: list

    def run(self, model, config) -> float:
        """The mean held-out loss per target token."""
        return evaluate(model, self.batches, config.device, config.precision, config.loss_chunk)


# -- Finishing: what the user came for ------------------------------------------------------------

def finish(config: TrainConfig, out: Path, model, tokenizer):
    """Write the adapter (LoRA) or the model (full), and with --merge the merged model in our
    format and Hugging Face's."""
    write_results(config, out, model, tokenizer)
    if config.method in ("lora", "qlora"):
        from export import peft_base_note
        print(f"saved the adapter to {out / 'adapter'} (in PEFT's layout: {out / 'peft'})"
              + peft_base_note(config.checkpoint, out))
        if config.merge:
            if config.method == "qlora":  # 4-bit weights cannot hold W + ΔW: 16-bit ones first
                from speed.quant import dequantize_model
                dequantize_model(model)
            merge_lora(model)
            write_results(replace(config, method="full"), out, model, tokenizer)  # as a model
    if config.method == "full" or config.merge:
        print(f"saved the model to {out / 'model'} (load it with --checkpoint {out / 'model'})")
    if config.merge:
        from export import export_hf, write_chat_template
        export_hf(model, out / "hf", tokenizer, template_name=config.template)
        write_chat_template(out / "hf", data.jinja_form(templates.get_template(config.template),
                                                        tokenizer))
        print(f"saved a Hugging Face checkpoint to {out / 'hf'}")
    plot_losses(out)


def write_results(config: TrainConfig, directory: Path, model, tokenizer):
    """The adapter (LoRA: adapter/, and peft/ in PEFT's layout) or the model (full: model/, with
    the tokenizer, so that `generate.py --checkpoint` finds it there) into `directory`, with the
    chat template the run was trained with: out/ at the end, out/best/ at each new lowest
    held-out loss."""
    from export import export_peft, peft_base_path, write_chat_template
    chat_template = data.jinja_form(templates.get_template(config.template), tokenizer)
    if config.method in ("lora", "qlora"):
        save_adapter(model, directory / "adapter", base_id={"checkpoint": config.checkpoint})
        export_peft(model, directory / "peft",
                    base_model_name_or_path=peft_base_path(config.checkpoint))
        write_chat_template(directory / "peft", chat_template)
    else:
        save_checkpoint(model, directory / "model")
        tokenizer.save(directory / "model")
        write_chat_template(directory / "model", chat_template)


# -- Around the loop ------------------------------------------------------------------------------

def nan_message(loss, grad_norm, step, config, out) -> str:
    what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    hint = "try --precision bf16 or fp32" if config.precision == "fp16" else "try a lower --lr"
    if not (out / "checkpoint.pt").exists():
        saved = f"No checkpoint was saved before it (--save-every {config.save_every})"
    elif config.precision == "fp16":  # (--precision cannot change on --resume)
        saved = f"The last good checkpoint is in {out}"
    else:
        saved = f"The last good checkpoint is in {out}: go on from it with --resume --lr LOWER"
    return (f"{what} at step {step + 1}; stopped before updating the weights ({hint}). "
            f"{saved}")


if __name__ == "__main__":
    run_cli(main)
