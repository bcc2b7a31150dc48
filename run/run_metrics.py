"""What a run shows and logs: the console (`Log`: a progress bar, or plain lines in a file), and
metrics.jsonl and loss.png, read back for the plot and cut back to the checkpoint's step on
--resume (run/run_dir.py has the rest of the run's directory)."""
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from formats.files import atomic_write
from run.run_dir import LOGS, METRICS, writing


def log_metrics(out: Path, row: dict, name: str = METRICS):
    """Append one row to out/metrics.jsonl (or another of the run's LOGS)."""
    with writing(out / name), open(out / name, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """([(line, row)], numbers of the lines that are not a row): a kill in the middle of an
    append leaves a last line cut short."""
    rows, unreadable = [], []
    text = path.read_text(errors="replace")  # (a torn line may end inside a character)
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if _is_metrics_row(row):
            rows.append((line if line.endswith("\n") else line + "\n", row))
        else:
            unreadable.append(number)
    return rows, unreadable


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # (True is an int)


def _is_metrics_row(row) -> bool:
    """A row as Log writes it: a step, and numbers for what plot_losses draws."""
    return (isinstance(row, dict) and type(row.get("step")) is int
            and all(is_number(row[key]) for key in ("loss", "val_loss") if key in row))


def drop_metrics_after(out: Path, step: int):
    """On resume, the steps logged after the checkpoint are done again: drop their rows (in
    metrics.jsonl, samples.jsonl, token_losses.jsonl), or they would appear twice. Unreadable
    lines are dropped too, with a note."""
    for path in (out / name for name in LOGS):
        if not path.exists():
            continue
        rows, unreadable = read_metrics(path)
        if unreadable:
            lines = "line" if len(unreadable) == 1 else "lines"
            print(f"note: {path}: skipped {len(unreadable)} unreadable {lines} "
                  f"({lines} {', '.join(map(str, unreadable))}): not rows of {path.name} (a run "
                  "killed while writing leaves a torn last line)")
        kept = "".join(line for line, row in rows if row["step"] <= step)
        with writing(path):
            atomic_write(path, lambda tmp: Path(tmp).write_text(kept))


def plot_losses(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
        return
    if not (out / METRICS).exists():
        return
    rows = [row for _, row in read_metrics(out / METRICS)[0]]
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
        if done:  # (on a terminal the progress bar starts there too; in a log file, only this)
            self.say(f"resuming from step {done} of {total}")
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

    def evaluation(self, step: int, val_loss: float, out: Path):
        if self.speaks:
            perplexity = math.exp(min(val_loss, 50))  # e^loss: as unsure as a choice among so many
            log_metrics(out, {"step": step, "val_loss": val_loss, "val_ppl": perplexity})
            self.write(f"step {step}: val loss {val_loss:.4f} (perplexity {perplexity:.2f})")

    def samples(self, rows: list[dict]):
        """The newest answers to the sample prompts (samples.jsonl has them all)."""
        for row in rows:
            prompt = row["prompt"] if len(row["prompt"]) <= 40 else row["prompt"][:39] + "…"
            self.write(f"  sample: {prompt!r} → {row['answer']!r}")

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.say(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
