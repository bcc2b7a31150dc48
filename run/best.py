"""out/best/: the adapter (or model) of the evaluation with the lowest held-out loss, and
--early-stop N: stop after N evaluations in a row without a new lowest.

    out/best/adapter/, peft/   LoRA, QLoRA: what the end of the run writes in out/, at that step
    out/best/model/            full fine-tuning
    out/best/config.json       the run's, so that `generate.py --checkpoint out/best` reads it as
                               a run, on the same base model
    out/best/best.json         {"step", "val_loss"}: which evaluation it is

The training loss keeps falling while the model memorises its examples; the held-out loss turns
up when it starts to. best/ keeps the weights from before that turn (the evaluation at step 0,
the model before any training, counts too). It is replaced atomically: the new one is written
into a temporary folder, and two renames swap it in (best/ → .best.previous.tmp, the new →
best/). A crash before the first rename leaves the old best/ and a temporary folder, removed at
the next start; a crash between the renames leaves the old one as .best.previous.tmp, renamed back
at the next start.

Which evaluation is the lowest comes from metrics.jsonl, the logged held-out losses: --resume cuts
it back to the checkpoint's step, and the evaluations the resumed run does again give the same
losses, so it replaces best/ and stops early exactly where the uninterrupted run did. (One that goes
on with another --lr may not reach the loss of a best/ written after its checkpoint again: best/
then keeps that one, whose row of metrics.jsonl the resumed run dropped, until a lower loss.)
"""
import math
import os
import secrets
import shutil
from pathlib import Path

from errors import UserError
from formats.files import write_json
from run.processes import ONE_PROCESS
from run.run_dir import CONFIG, METRICS, writing
from run.run_metrics import read_metrics

BEST, BEST_JSON = "best", "best.json"
PREVIOUS = ".best.previous.tmp"  # the old best/ while the new one is renamed in


class BestKeeper:
    """Told every held-out loss (evaluated), it keeps out/best/ and counts for --early-stop.
    write(directory) writes the results into a directory as the end of the run does; None: no
    best/ is written, only counted (torchrun's other ranks: rank 0 writes; see keep_best).
    owner: this process looks after out/ (rank 0). processes: run/processes.py's."""

    def __init__(self, out: Path, write, patience: int = 0, step: int = 0, owner: bool = True,
                 processes=ONE_PROCESS):
        self.out, self.write, self.patience = Path(out), write, patience
        self.processes = processes
        if owner:
            with writing(self.out / BEST):
                recover(self.out)
                if step == 0:  # a run started over: a best/ it holds is of the run it replaces
                    shutil.rmtree(self.out / BEST, ignore_errors=True)
        self.lowest, self.since = math.inf, 0  # the lowest loss; evaluations after it
        for loss in logged_losses(self.out, step):
            self.count(loss)

    def count(self, val_loss: float) -> bool:
        """True when `val_loss` is a new lowest; else one more evaluation without one (a tie, a
        NaN or an infinity included)."""
        if val_loss < self.lowest:
            self.lowest, self.since = val_loss, 0
            return True
        self.since += 1
        return False

    def evaluated(self, step: int, val_loss: float) -> bool:
        """Count an evaluation and keep best/ up to date; True when --early-stop says stop."""
        if self.count(val_loss) and self.write:
            save_best(self.out, self.write, step, val_loss)
        stop = 0 < self.patience <= self.since
        if self.patience:  # under torchrun all ranks stop together, even if their losses differ
            stop = self.processes.mean(float(stop)) > 0  # in the last bit
        return stop

    def stop_line(self, step: int) -> str:
        line = (f"early stop at step {step}: {self.since} evaluations without a lower held-out "
                f"loss than {self.lowest:.4f} (--early-stop {self.patience})")
        return line + ("; best/ holds the weights of that one" if self.write else "")


def keep_best(config, out: Path, validation, step: int, write, processes=ONE_PROCESS):
    """The run's BestKeeper (train_sft.py): write(directory) writes the adapter or the model as
    the end of the run does. --early-stop counts evaluations of held-out data: a run without any
    cannot use it. Under torchrun rank 0 writes best/; with --method full it is not kept there
    (each rank holds a shard of the weights, not a model to write), and a note says so."""
    if config.early_stop and validation is None:
        raise UserError(f"--early-stop {config.early_stop} needs held-out data, and this run has "
                        "none: give --val-data, or a --val-split that leaves some")
    if validation is None or not processes.is_main:
        write = None
    elif processes.world > 1 and config.method == "full":
        print("note: under torchrun, --method full keeps no best/ (its weights are sharded)")
        write = None
    return BestKeeper(out, write, config.early_stop, step, processes.is_main, processes)


def logged_losses(out: Path, step: int) -> list[float]:
    """The held-out losses metrics.jsonl holds up to `step`, in order."""
    if not (out / METRICS).is_file():
        return []
    rows = [row for _, row in read_metrics(out / METRICS)[0]]
    return [row["val_loss"] for row in rows if "val_loss" in row and row["step"] <= step]


def save_best(out: Path, write, step: int, val_loss: float):
    """Write the results into a new temporary folder, then swap it in for best/ (see above)."""
    best = out / BEST
    with writing(best):
        temp = out / f".{BEST}.{secrets.token_hex(4)}.tmp"  # (run_dir.TEMP_FILE's form)
        temp.mkdir()
        try:
            write(temp)
            shutil.copyfile(out / CONFIG, temp / CONFIG)
            write_json(temp / BEST_JSON, {"step": step, "val_loss": val_loss})
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        if best.exists():
            os.replace(best, out / PREVIOUS)
        os.replace(temp, best)
        shutil.rmtree(out / PREVIOUS, ignore_errors=True)


def recover(out: Path):
    """After a crash in save_best: the previous best/ back in place, temporary folders removed."""
    previous = out / PREVIOUS
    if previous.is_dir() and not (out / BEST).exists():
        os.replace(previous, out / BEST)
    for path in out.glob(f".{BEST}.*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

