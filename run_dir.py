"""The output directory of a training run: what train_sft.py writes, and how it resumes.

    out/config.json      the resolved settings; --resume refuses a run that would differ
    out/checkpoint.pt    trainable weights, AdamW state, step, RNG states: one file, written atomically
    out/metrics.jsonl    one row per step and per evaluation
    out/loss.png         the curves, drawn at the end (if matplotlib is installed)

`dist` is a distributed.Distributed under torchrun, else None.
"""
import json
from pathlib import Path

import torch

from checkpoint import atomic_write, write_json
from errors import UserError

# Settings that decide the model, the data order or the parameters: a resumed run must match them.
RESUME_MUST_MATCH = ("checkpoint", "data", "val_data", "val_split", "template", "train_on_prompt", "method",
                     "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "dora", "seq_len",
                     "batch_size", "grad_accum", "seed", "packing", "world_size")


def prepare_out(args, write=True) -> Path:
    """Refuse to overwrite another run; on --resume, refuse a config that changes the run."""
    out = Path(args.out)
    run_config = dict(vars(args))
    previous = out / "config.json"
    if args.resume:
        if not previous.exists():
            raise UserError(f"--resume: {out} holds no run (no config.json)")
        old = json.loads(previous.read_text())
        changed = [k for k in RESUME_MUST_MATCH if old.get(k) != run_config.get(k)]
        if changed:
            raise UserError(f"--resume: {out} was trained with different settings: "
                            + ", ".join(f"{k} {old.get(k)!r} → {run_config.get(k)!r}" for k in changed))
    elif previous.exists() and any((out / f).exists() for f in ("checkpoint.pt", "metrics.jsonl")):
        # (config.json alone is a run that failed before its first step, e.g. on a wrong path: nothing to lose)
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    try:
        if write:
            write_json(previous, run_config)
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror}") from None
    return out


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def save_state(out: Path, model, optimizer, scaler, step, dist=None):
    """Everything needed to continue exactly, in ONE file written atomically (write + rename):
    trainable weights, AdamW moments, step (which fixes the data position and the schedule) and
    each rank's RNG state (dropout masks)."""
    if dist:  # gather the shards (every rank takes part), then rank 0 writes
        model_state, optimizer_state = dist.training_state(model, optimizer)
        rng = dist.rng_states(_rng_state())
        if not dist.is_main:
            return
    else:
        trainable = _trainable_names(model)
        model_state = {k: v for k, v in model.state_dict().items() if k in trainable}
        optimizer_state, rng = optimizer.state_dict(), [_rng_state()]
    state = {"model": model_state, "optimizer": optimizer_state, "step": step, "rng": rng,
             "scaler": scaler.state_dict() if scaler else None}
    atomic_write(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def load_state(out: Path, model, optimizer, scaler, dist=None) -> int:
    """Restore what save_state wrote; return the step to continue from."""
    path = out / "checkpoint.pt"
    if not path.exists():
        raise UserError(f"--resume: no checkpoint in {out} (expected {path.name})")
    state = torch.load(path, map_location="cpu", weights_only=True)  # untrusted file: tensors only
    missing = _trainable_names(model) - set(state["model"])
    if missing:
        raise UserError(f"--resume: {path} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
    if dist:
        dist.load_training_state(model, optimizer, state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"][dist.rank if dist else 0]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


def log_metrics(out: Path, row: dict):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def drop_metrics_after(out: Path, step: int):
    """On resume, the steps logged after the checkpoint are done again: drop their rows, or they
    would appear twice."""
    if (out / "metrics.jsonl").exists():
        rows = [line for line in open(out / "metrics.jsonl") if json.loads(line)["step"] <= step]
        atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(rows)))


def plot_losses(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set(xlabel="optimizer step", ylabel="loss per target token", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
