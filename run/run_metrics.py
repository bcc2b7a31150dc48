"""metrics.jsonl and loss.png: what a run logs at each step and evaluation, read back for the
plot and cut back to the checkpoint's step on --resume (run/run_dir.py has the rest of the run's
directory)."""
import json
from pathlib import Path

from formats.files import atomic_write
from run.run_dir import METRICS, writing


def log_metrics(out: Path, row: dict):
    with writing(out / METRICS), open(out / METRICS, "a") as f:
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


def _is_metrics_row(row) -> bool:
    """A row as Log writes it: a step, and numbers for what plot_losses draws."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return (isinstance(row, dict) and type(row.get("step")) is int
            and all(number(row[key]) for key in ("loss", "val_loss") if key in row))


def drop_metrics_after(out: Path, step: int):
    """On resume, the steps logged after the checkpoint are done again: drop their rows, or they
    would appear twice. Unreadable lines are dropped too, with a note."""
    path = out / METRICS
    if not path.exists():
        return
    rows, unreadable = read_metrics(path)
    if unreadable:
        lines = "line" if len(unreadable) == 1 else "lines"
        print(f"note: {path}: skipped {len(unreadable)} unreadable {lines} "
              f"({lines} {', '.join(map(str, unreadable))}): not rows of metrics (a run killed "
              "while writing leaves a torn last line)")
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
