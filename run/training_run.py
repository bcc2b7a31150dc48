"""A training run as the loop sees it: its directory, its log and its processes, in one object.

    run.step(row)               a row of metrics.jsonl, and the progress bar or a log line
    run.evaluation(step, ...)   the held-out loss and the sample answer
    run.save(...)               checkpoint.pt (run/run_dir.py: save_state), atomically
    run.processes               one process, or torchrun's (run/processes.py)

Only the main process writes or prints; under torchrun the others stay quiet.
"""
from pathlib import Path

from run.run_dir import save_state
from run.run_metrics import Log


class TrainingRun:
    def __init__(self, out: Path, log: Log, processes):
        self.out = out
        self.log = log
        self.processes = processes
        self.saved_step = None  # the step of the last save: a stop right after it saves nothing

    def say(self, text: str):
        self.log.say(text)

    def start(self, total_steps: int, step: int):
        self.log.start(total_steps, step)

    def step(self, row: dict):
        self.log.step(row, self.out)

    def evaluation(self, step: int, val_loss: float, sample: str):
        self.log.evaluation(step, val_loss, sample, self.out)

    def save(self, model, optimizer, scaler, step: int):
        save_state(self.out, model, optimizer, scaler, step, self.processes)
        self.saved_step = step

    def close(self):
        self.log.close()
