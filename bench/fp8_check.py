"""--fp8 checked on one GPU in one call: numerics, speed, and training next to bf16. JSON lines.

    python -m bench.fp8_check                       # an H100/H200: about 5 minutes
    python -m bench.fp8_check --parts speed-full    # Llama-3.2-1B full fine-tuning: 3 minutes
    python -m bench.fp8_check --device cpu --tiny   # a smoke test of this script: a minute
    python -m bench.fp8_check --parts real --checkpoint DIR --data alpaca.json   # (d), below

(a) numerics: the FP8 layers of speed/fp8.py against float32 products on Llama-3-8B's projection
    shapes, 2×2048 tokens, random weights (N(0, 0.02)) and activations with the outlier channels
    and per-token magnitudes of a real model's (a few channels 20× the rest); bf16's own error
    beside them. Per token (or weight row): ‖approx − exact‖ / ‖exact‖, mean and max.
(b) speed: `python -m bench --compile` with and without --fp8, one process each (tokens/s, peak
    memory, MFU against the bf16 peak), and the ratios: Llama-3.2-1B LoRA 8×2048 and Llama-3-8B
    LoRA 2×2048; speed-full: Llama-3.2-1B full fine-tuning 8×2048, pure bf16 and float32 master
    weights.
(c) training: the SmolLM2-135M shape with random weights, LoRA and full fine-tuning, the same
    steps with and without --fp8 on the same synthetic token stream, and the held-out loss of
    each. The stream is a fixed random Markov chain (each token has 4 possible successors), so
    there is something to learn: the loss falls from ln(vocabulary) towards ln(4). It checks
    that FP8 trains as bf16 does.
(d) real (asked for by name): train_sft.py on a real model and data, LoRA, with and without
    --fp8, and the held-out loss curves (metrics.jsonl).
"""
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.bench import build
from errors import (ArgumentParser, UserError, default_device, device_name, positive_int,
                    run_cli)
from lora import apply_lora
from model import ModelConfig
from speed.fp8 import Float8Linear, FrozenFloat8Linear, check_fp8, use_fp8
from train_sft import TrainConfig, count_targets, evaluate, lr_at, make_optimizer, train_step

# Llama-3-8B's projections, (in, out)
SHAPES_8B = {"q,o": (4096, 4096), "k,v": (4096, 1024), "gate,up": (4096, 14336),
             "down": (14336, 4096)}
SHAPES_TINY = {"tiny up": (128, 256), "tiny down": (256, 128)}
SPEED_ROWS = [("llama-3.2-1b", "lora", 8, []), ("llama-3-8b", "lora", 2, [])]
TINY_SPEED_ROWS = [("tiny", "lora", 2, []), ("tiny", "full", 2, [])]
FULL_SPEED_ROWS = [("llama-3.2-1b", "full", 8, ["--pure-bf16"]), ("llama-3.2-1b", "full", 8, [])]
SMOLLM2 = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                      vocab_size=49152, rope_theta=100000.0, max_seq_len=8192,
                      tie_embeddings=True)  # SmolLM2-135M (bench/peer_hf_peft.py's smollm2-135m)
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176, vocab_size=512,
                   max_seq_len=512)


def say(**fields):
    print(json.dumps(fields), flush=True)


def row_errors(approx, exact) -> dict:
    """Mean and max over rows of ‖approx − exact‖ / ‖exact‖ (rows of exact zeros left out)."""
    exact = exact.float()
    norms = exact.norm(dim=-1)
    errors = (approx.float() - exact).norm(dim=-1)[norms > 0] / norms[norms > 0]
    return {"mean": round(errors.mean().item(), 5), "max": round(errors.max().item(), 5)}


def activations(tokens, n, device, g):
    """Like a real model's: per-token magnitudes spread over e^±1, and a few channels 20× the
    rest (the outlier features of LLM activations, which rowwise scaling has to live with)."""
    x = torch.randn(tokens, n, device=device, generator=g)
    x *= torch.exp(torch.randn(tokens, 1, device=device, generator=g))
    x[:, torch.randperm(n, device=device, generator=g)[:max(1, n // 512)]] *= 20
    return x


def numerics(shapes, tokens, device):
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    g = torch.Generator(device).manual_seed(0)
    for name, (n_in, n_out) in shapes.items():
        w = torch.randn(n_out, n_in, device=device, generator=g) * 0.02
        x = activations(tokens, n_in, device, g)
        dy = activations(tokens, n_out, device, g) * 1e-3
        dy[: tokens * 3 // 10] = 0  # prompt tokens: no gradient
        exact = {"y": x @ w.t(), "dx": dy @ w, "dW": dy.t() @ x}
        xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
        bf16 = {"y": xb @ wb.t(), "dx": dyb @ wb, "dW": dyb.t() @ xb}
        frozen = FrozenFloat8Linear(wb)  # LoRA: stored from the bf16 base
        full = Float8Linear.from_linear(torch.nn.Linear(n_in, n_out, bias=False, device=device))
        full.weight.data.copy_(w)  # full fine-tuning: the float32 master weight
        results = {}
        for label, layer in (("fp8_lora_base", frozen), ("fp8_full", full)):
            x_in = xb.clone().requires_grad_()
            y = layer(x_in)
            y.backward(dyb)
            results[label] = {"y": y, "dx": x_in.grad}
            if label == "fp8_full":
                results[label]["dW"] = layer.weight.grad
        errors = {f"{label}_{k}": row_errors(v, exact[k])
                  for label, products in [("bf16", bf16), *results.items()]
                  for k, v in products.items()}
        say(check="numerics", shape=f"{name} {n_in}->{n_out}", tokens=tokens, **errors)


def speed(rows, tiny: bool, device: str):
    """Each row with and without --fp8, `python -m bench` in its own process (its own peak);
    `tiny`: the tiny shape, one step, no compilation (a CPU compiles slowly)."""
    for shape, method, batch, extra in rows:
        lines = []
        for fp8 in (False, True):
            args = ["--shape", shape, "--method", method, "--batch-size", str(batch), *extra]
            if tiny:
                args += ["--seq-len", "64", "--steps", "1", "--warmup", "1", "--precision", "bf16"]
            else:
                args += ["--seq-len", "2048", "--compile"]
            args += ["--device", device] + (["--fp8"] if fp8 else [])
            command = [sys.executable, "-m", "bench", *args]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            results = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not results:
                say(check="speed", command="python -m bench " + " ".join(args),
                    error=done.stderr[-2000:])
                break
            lines.append(json.loads(results[-1]))
            say(check="speed", command="python -m bench " + " ".join(args), **lines[-1])
        if len(lines) == 2:
            bf16, fp8 = lines
            memory = None
            if bf16["peak_mem_gib"]:
                memory = round(fp8["peak_mem_gib"] / bf16["peak_mem_gib"], 3)
            say(check="speed_ratio", shape=shape, method=method, extra=extra,
                tokens_per_s=round(fp8["tokens_per_s"] / bf16["tokens_per_s"], 3),
                peak_memory=memory, mfu_bf16=bf16["mfu_vs_989T"], mfu_fp8=fp8["mfu_vs_989T"])


def markov_batches(n_batches, batch, seq, vocab, seed):
    """Token rows from a fixed random Markov chain over `vocab` tokens: each token is followed by
    one of 4 successors (the same table for every seed), chosen at random."""
    successors = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n_batches * batch, seq, dtype=torch.long)
    rows[:, 0] = torch.randint(0, vocab, (len(rows),), generator=g)
    for i in range(1, seq):
        pick = torch.randint(0, 4, (len(rows),), generator=g)
        rows[:, i] = successors[rows[:, i - 1], pick]
    return [{"tokens": b, "labels": b.clone(), "positions": None, "doc_ids": None}
            for b in rows.split(batch)]


def train(c, method, fp8, batches, held_out, device, lr):
    """The steps of train_sft.py (make_optimizer, train_step) on a random-weight model: the loss
    of each step, the held-out loss at the end."""
    model = build(c, method, device, torch.bfloat16)  # the same random weights every time
    if fp8:
        use_fp8(model, method, say=lambda line: print(line, file=sys.stderr))
    if method == "lora":
        torch.manual_seed(0)  # the same adapters every time
        apply_lora(model, "all", r=16, alpha=32, dropout=0.0)
    model.train()
    settings = TrainConfig(method=method, device=device, precision="bf16", loss_chunk=1024)
    optimizer = make_optimizer(model, lr, 0.0, device)
    losses = []
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, len(batches) // 10, len(batches))
        batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
        losses.append(train_step(model, optimizer, [batch], count_targets(batch), settings)[0])
    return losses, evaluate(model, held_out, device, "bf16", 1024)


def training(c, steps, batch, seq, device):
    vocab = min(c.vocab_size, 1024)  # a chain over the first 1024 tokens: learnable in a few steps
    batches = markov_batches(steps, batch, seq, vocab, seed=1)
    held_out = markov_batches(2, batch, seq, vocab, seed=2)
    for method, lr in (("lora", 1e-2), ("full", 2e-3)):
        held = {}
        for fp8 in (False, True):
            started = time.perf_counter()
            losses, held[fp8] = train(c, method, fp8, batches, held_out, device, lr)
            say(check="training", method=method, fp8=fp8, steps=steps, tokens_per_step=batch * seq,
                lr=lr, seconds=round(time.perf_counter() - started, 1),
                losses=[round(loss, 4) for loss in losses], held_out_loss=round(held[fp8], 5))
        say(check="training_result", method=method, held_out_bf16=round(held[False], 5),
            held_out_fp8=round(held[True], 5), floor=round(math.log(4), 4),
            relative_difference=round(abs(held[True] - held[False]) / held[False], 5))


def real_model(checkpoint, data, steps, device):
    """train_sft.py itself on a real model and data, LoRA, with and without --fp8: the held-out
    loss every steps/6 steps (metrics.jsonl) and the relative difference at the end."""
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fp8 in (False, True):
            out = Path(tmp) / ("fp8" if fp8 else "bf16")
            args = ["--checkpoint", checkpoint, "--data", data, "--out", str(out), "--device",
                    device, "--max-steps", str(steps), "--eval-every", str(max(1, steps // 6)),
                    "--save-every", str(steps), "--batch-size", "8", "--grad-accum", "1",
                    "--warmup-steps", str(max(1, steps // 10))]
            args += ["--compile"] if device.startswith("cuda") else []
            args += ["--fp8"] if fp8 else []
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "train_sft.py", *args], capture_output=True,
                                  text=True, timeout=600)
            if done.returncode:
                say(check="real", command="python train_sft.py " + " ".join(args),
                    error=done.stderr[-3000:])
                return
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            curves[fp8] = {r["step"]: round(r["val_loss"], 5) for r in rows if "val_loss" in r}
            speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
            say(check="real", fp8=fp8, command="python train_sft.py " + " ".join(args),
                seconds=round(time.perf_counter() - started, 1), held_out=curves[fp8],
                tokens_per_s_last=speeds[-1] if speeds else None)
    last = max(curves[False])
    say(check="real_result", step=last, held_out_bf16=curves[False][last],
        held_out_fp8=curves[True][last],
        relative_difference=round(abs(curves[True][last] - curves[False][last])
                                  / curves[False][last], 5))


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", type=device_name, default=default_device(), help="cuda or cpu")
    p.add_argument("--tiny", action="store_true",
                   help="small shapes and few steps: a smoke test of this script (on a CPU)")
    p.add_argument("--steps", type=positive_int, default=40, help="training steps of part (c)")
    p.add_argument("--parts", default="numerics,speed,training",
                   help="which parts to run, of numerics, speed (LoRA), speed-full (full "
                   "fine-tuning), training, real (train_sft.py on --checkpoint and --data)")
    p.add_argument("--checkpoint", help="part real: a model (default: none)")
    p.add_argument("--data", help="part real: its training data (default: none)")
    p.add_argument("--real-steps", type=positive_int, default=60,
                   help="part real: optimizer steps of each run")
    a = p.parse_args(argv)
    check_fp8("lora", "bf16", a.device, allow_cpu=a.tiny)  # a GPU without FP8: one line, here
    if a.device.startswith("cuda"):
        say(check="device", gpu=torch.cuda.get_device_name(a.device), torch=torch.__version__,
            capability=list(torch.cuda.get_device_capability(a.device)))
    steps = min(a.steps, 4) if a.tiny else a.steps
    parts = {
        "numerics": lambda: numerics(SHAPES_TINY if a.tiny else SHAPES_8B,
                                     64 if a.tiny else 4096, a.device),
        "speed": lambda: speed(TINY_SPEED_ROWS if a.tiny else SPEED_ROWS, a.tiny, a.device),
        "speed-full": lambda: speed(TINY_SPEED_ROWS if a.tiny else FULL_SPEED_ROWS, a.tiny,
                                    a.device),
        "training": lambda: training(TINY if a.tiny else SMOLLM2, steps, 2 if a.tiny else 8,
                                     32 if a.tiny else 256, a.device),
        "real": lambda: real_model(a.checkpoint, a.data, a.real_steps, a.device),
    }
    if "real" in a.parts.split(",") and not (a.checkpoint and a.data):
        raise UserError("--parts real needs --checkpoint and --data")
    for name in a.parts.split(","):
        if name not in parts:
            raise UserError(f"--parts: unknown part {name!r}; known: {', '.join(parts)}")
        started = time.perf_counter()
        try:  # one part failing (a kernel the GPU refuses) leaves the others their say
            parts[name]()
        except Exception:
            say(check=name, error=traceback.format_exc()[-3000:])
        say(check=f"{name}_done", seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    run_cli(main)
