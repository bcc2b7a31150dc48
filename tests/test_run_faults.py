"""Faults around a run, as a user meets them: signals, a diverged run, hand-edited files, failed
writes, a start that fails.

1. Ctrl-C (SIGINT) and SIGTERM at any moment of a step, with LoRA dropout on: --resume is bit for
   bit the uninterrupted run. A second signal is harmless.
2. --resume may change the learning rate, its schedule, the run's length and the cadences (one
   note; config.json keeps the history); never what makes the checkpoint meaningless.
3. A hand-edited checkpoint.pt, config.json or metrics.jsonl: one line naming it.
4. Write errors (a full disk, a read-only directory, a name too long, a symlink loop): one line,
   nothing already written lost.
5. A start that fails before its first step leaves nothing behind that it created.

In-process runs use the demo at a tiny size (a second or two each); the random-moment signal
tests run train_sft.py as a subprocess, as a user would, and are sampled to keep the suite fast.
"""
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from run import run_dir
from run import run_metrics
from run.stop import STOP
import train_sft
from conftest import ROOT
from errors import UserError
from test_faults import has_rows, run, train_argv
from test_run_dir import assert_one_line_error, cli

DEMO_RECORDS = json.loads((ROOT / "examples" / "alpaca_demo.json").read_text())


# ---------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def pytest_keeps_its_signal_handlers():
    """train_sft.main installs its own handlers, and a test that signals leaves them ignoring the
    next SIGTERM (run/stop.py): give pytest back its own after each test."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    """8 short demo records, in a folder of their own (never inside an --out)."""
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(DEMO_RECORDS[:8]))
    return path


def lora_argv(train, out, *extra) -> list[str]:
    """The demo model with LoRA (dropout 0.05, the default), 4 steps of 2 examples."""
    argv = ["--checkpoint", "tiny", "--data", train, "--out", out, "--template", "none",
            "--seq-len", 64, "--batch-size", 2,
            "--val-split", 0, "--warmup-steps", 1, "--max-steps", 4, "--save-every", 100,
            "--method", "lora", "--sample-tokens", 2, *extra]  # (short answers: a fast test)
    return [str(a) for a in argv]


def saved_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path):
    one, other = saved_state(a), saved_state(b)
    assert one["step"] == other["step"]
    assert one["model"].keys() == other["model"].keys()
    for name in one["model"]:
        assert torch.equal(one["model"][name], other["model"][name]), name


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(train, tmp_path_factory) -> Path:
    """The uninterrupted LoRA run that the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("straight") / "out"
    train_sft.main(lora_argv(train, out))
    return out


# ---------------------------------------------------------------- 1. signals

def signal_during(monkeypatch, where: str, signum, call: int):
    """Send `signum` to this process from inside the call-th forward pass (after it has drawn
    its dropout masks) or the call-th AdamW update (after it has changed the weights)."""
    calls = []

    def then_signal(result):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return result
    if where == "forward":
        real_loss = train_sft.batch_loss
        monkeypatch.setattr(train_sft, "batch_loss",
                            lambda *args, **kwargs: then_signal(real_loss(*args, **kwargs)))
    else:
        real_make = train_sft.make_optimizer

        def make_optimizer(*args, **kwargs):
            optimizer = real_make(*args, **kwargs)
            real_step = optimizer.step
            optimizer.step = lambda: then_signal(real_step())
            return optimizer
        monkeypatch.setattr(train_sft, "make_optimizer", make_optimizer)


@pytest.mark.parametrize("signum, where", [(signal.SIGTERM, "forward"), (signal.SIGINT, "update")])
def test_a_signal_in_the_middle_of_a_step_then_resume_is_exact(train, tmp_path, straight,
                                                               monkeypatch, capsys, signum,
                                                               where):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        signal_during(m, where, signum, call=2)
        code, _, err = cli(lora_argv(train, out), capsys)
    assert code == 130, err
    assert f"interrupted: saved step 2 to {out / 'checkpoint.pt'}" in err  # the step it was in
    assert not (out / "adapter").exists()
    code, stdout, err = cli(lora_argv(train, out, "--resume"), capsys)
    assert code == 0, err
    assert "resuming from step 2 of 4" in stdout  # (not a terminal: no progress bar shows it)
    assert metrics_steps(out) == [1, 2, 3, 4]
    assert_same_weights(out, straight)


def signal_when(argv, ready, signals, timeout=120.0):
    """Start argv, poll `ready()` every millisecond, then send each of `signals` (a pause
    between them). (returncode, stderr), or None if the run ended before it was ready."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.001)
    if proc.poll() is not None:
        proc.communicate()
        return None
    for signum, pause in signals:
        proc.send_signal(signum)
        time.sleep(pause)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_signals_at_random_moments_then_resume_is_exact(tmp_path):
    """SIGTERM, then Ctrl-C (SIGINT), each at a random moment of a LoRA run with dropout, each
    followed by --resume: the adapter is bit for bit the uninterrupted run's. SIGTERM comes twice
    in a row: the second one is harmless (no traceback, the same exit)."""
    rng = random.Random(19)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(DEMO_RECORDS[:8]))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    lora = ["--method", "lora"]
    done = run(train_argv(data, straight) + lora)
    assert done.returncode == 0, done.stderr
    argv = train_argv(data, stopped) + lora
    moments = [(signal.SIGTERM, rng.randint(1, 3), [0.002, 0]),
               (signal.SIGINT, rng.randint(5, 7), [0])]
    stops = []
    for signum, row, pauses in moments:
        delay = rng.uniform(0, 0.05)  # within a step or a save, wherever it falls
        result = signal_when(argv, lambda: has_rows(stopped, row) and time.sleep(delay) is None,
                             [(signum, pause) for pause in pauses])
        if result is not None:
            code, err = result
            stops.append(signum)
            assert code == 130, err
            assert "Traceback" not in err and "interrupted: saved step" in err, err
        argv = train_argv(data, stopped) + lora + ["--resume"]
    assert len(stops) >= 2, stops
    done = run(argv)
    assert done.returncode == 0, done.stderr
    assert metrics_steps(stopped) == list(range(1, 9))
    assert_same_weights(stopped, straight)
    adapter = "adapter/adapter.safetensors"
    assert (straight / adapter).read_bytes() == (stopped / adapter).read_bytes()


def test_a_second_signal_while_loading_is_harmless(train, tmp_path, monkeypatch, capsys):
    """Outside the loop a signal stops at once; a second one (a user pressing Ctrl-C twice, a
    cluster sending SIGTERM again) does not break the exit."""
    out = tmp_path / "out"

    def build_model(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the first signal stops the run here")
    monkeypatch.setattr(train_sft, "build_model", build_model)
    real_exit = sys.exit

    def exit_with_a_second_signal(code):  # the second arrives while the process exits
        os.kill(os.getpid(), signal.SIGTERM)
        real_exit(code)
    monkeypatch.setattr(sys, "exit", exit_with_a_second_signal)
    code, _, err = cli(lora_argv(train, out), capsys)
    assert (code, err) == (130, "interrupted\n")


def test_the_callers_signal_handlers_come_back(train, tmp_path, monkeypatch, capsys):
    """train_sft.main called from other code (a test, a notebook) takes Ctrl-C and SIGTERM while
    it runs, and gives back the handlers it found after a finished run and a failed start. After
    a run a signal stopped, its own stay: the process is ending, and a second signal is ignored."""
    def mine(signum, frame):
        pass
    found = {signum: signal.signal(signum, mine) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli(lora_argv(train, tmp_path / "done"), capsys)[0] == 0
        assert [signal.getsignal(signum) for signum in found] == [mine, mine]
        assert cli(lora_argv(train, tmp_path / "failed", "--early-stop", 2), capsys)[0] == 2
        assert [signal.getsignal(signum) for signum in found] == [mine, mine]
        real_step = train_sft.train_step

        def interrupted_step(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a step
            return real_step(*args, **kwargs)
        monkeypatch.setattr(train_sft, "train_step", interrupted_step)
        assert cli(lora_argv(train, tmp_path / "stopped"), capsys)[0] == 130
        assert [signal.getsignal(signum) for signum in found] == [STOP.handle, STOP.handle]
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: nothing happens
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- 2. going on with other settings

@pytest.fixture
def diverged(train, tmp_path, monkeypatch, capsys):
    """A LoRA run of 4 steps, saved at each, whose loss turns NaN at step 3."""
    out = tmp_path / "out"
    argv = lora_argv(train, out, "--save-every", 1)
    real, calls = train_sft.train_step, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss, grad_norm = real(*args, **kwargs) if len(calls) < 3 else (math.nan, math.nan)
        return loss, grad_norm
    with monkeypatch.context() as m:
        m.setattr(train_sft, "train_step", diverging)
        code, _, err = cli(argv, capsys)
    assert_one_line_error(code, err, "loss is nan at step 3",
                          f"The last good checkpoint is in {out}: go on from it with --resume "
                          "--lr LOWER")
    return out, argv


def test_a_diverged_run_goes_on_with_a_lower_lr(diverged, capsys):
    out, argv = diverged
    lower = ["--lr", "1e-4", "--warmup-steps", "0", "--grad-clip", "0.5", "--max-steps", "5",
             "--eval-every", "2", "--sample-prompt", "Hi"]
    code, stdout, err = cli(argv + lower + ["--resume"], capsys)
    assert code == 0, err
    notes = [line for line in stdout.splitlines() if line.startswith("note: --resume")]
    assert notes == ["note: --resume from step 2 with --lr 0.002 → 0.0001, --warmup-steps 1 → 0, "
                     "--grad-clip 1.0 → 0.5, --max-steps 4 → 5, --eval-every 50 → 2, "
                     "--sample-prompt None → ['Hi'] (the learning rate's cosine now ends at the "
                     "new length): from here the run is not bit for bit the one it would have been "
                     "uninterrupted; config.json keeps the history"]
    assert metrics_steps(out) == [1, 2, 3, 4, 5]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {row["step"]: row["lr"] for row in rows if "lr" in row}
    assert [lrs[step] for step in (3, 4, 5)] == [train_sft.lr_at(step, 1e-4, 0, 5)
                                                 for step in (2, 3, 4)]  # the new schedule
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 1e-4 and config["max_steps"] == 5
    assert config["history"] == [{"step": 2, "lr": [0.002, 1e-4], "warmup_steps": [1, 0],
                                  "grad_clip": [1.0, 0.5], "max_steps": [4, 5],
                                  "eval_every": [50, 2], "sample_prompt": [None, ["Hi"]]}]
    # going on again keeps the history; the new settings are now the run's
    code, stdout, err = cli(argv + lower[:6] + ["--max-steps", "6", "--resume"], capsys)
    assert code == 0, err
    history = json.loads((out / "config.json").read_text())["history"]
    assert history[1:] == [{"step": 5, "max_steps": [5, 6], "eval_every": [2, 50],
                            "sample_prompt": [["Hi"], None]}]


@pytest.mark.parametrize("changed, named", [
    (["--method", "full"], "method 'lora' → 'full'"),
    (["--lora-r", "4"], "lora_r 16 → 4"),
    (["--lora-targets", "q,v"], "lora_targets"),
    (["--template", "alpaca"], "template 'none' → 'alpaca'"),
    (["--precision", "bf16"], "precision 'fp32' → 'bf16'"),
    (["--weight-decay", "0.1"], "weight_decay 0.0 → 0.1"),
    (["--batch-size", "1"], "batch_size 2 → 1"),
])
def test_resume_still_refuses_what_makes_the_checkpoint_meaningless(diverged, capsys, changed,
                                                                    named):
    out, argv = diverged
    before = (out / "config.json").read_bytes()
    code, _, err = cli(argv + changed + ["--lr", "1e-4", "--resume"], capsys)
    assert_one_line_error(code, err, f"--resume: {out} was trained with different settings: "
                          f"{named}")
    assert "lr 0.002" not in err  # (may change)
    assert (out / "config.json").read_bytes() == before


# ---------------------------------------------------------------- 3. hand-edited run directories

@pytest.fixture(scope="module")
def two_steps(train, tmp_path_factory) -> tuple[Path, list]:
    """A LoRA run of 4 steps stopped after 2 (checkpoint.pt at step 2, two rows of metrics)."""
    out = tmp_path_factory.mktemp("two_steps") / "out"
    argv = lora_argv(train, out, "--max-steps", 2)
    train_sft.main(argv)
    return out, lora_argv(train, out)


@pytest.fixture
def saved_run(two_steps, tmp_path) -> tuple[Path, list]:
    """A copy of two_steps to edit by hand, and the command that resumes it."""
    original, argv = two_steps
    out = tmp_path / "run"
    shutil.copytree(original, out)
    return out, [str(out) if a == str(original) else a for a in argv] + ["--resume"]


def edit_checkpoint(out: Path, edit):
    state = saved_state(out)
    edit(state)
    torch.save(state, out / "checkpoint.pt")


@pytest.mark.parametrize("edit, problem", [
    (lambda s: s.update(step="2"), "its step is '2', not a whole number >= 0"),
    (lambda s: s.update(step=2.0), "its step is 2.0, not a whole number >= 0"),
    (lambda s: s.update(step=-3), "its step is -3, not a whole number >= 0"),
    (lambda s: s["rng"][0].update(cpu=torch.zeros(10, dtype=torch.uint8)),
     "its random states are not as torch writes them"),
    (lambda s: s.update(rng={"cpu": None}), "its random states are not as torch writes them"),
    (lambda s: s.update(model=[1, 2]), "its model is not a set of named tensors"),
    (lambda s: s.update(optimizer="adamw"), "its optimizer state is not as torch writes it"),
])
def test_a_hand_edited_checkpoint_is_one_line(saved_run, capsys, edit, problem):
    out, argv = saved_run
    edit_checkpoint(out, edit)
    before = files_of(out)
    code, _, err = cli(argv, capsys)
    assert_one_line_error(code, err, f"--resume: {out / 'checkpoint.pt'} is damaged ({problem}); "
                          "delete it to start this run over from step 0")
    assert files_of(out) == before


def files_of(directory: Path) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def edit_config(out: Path, edit):
    config = json.loads((out / "config.json").read_text())
    config = edit(config) or config
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c.update(inputs=["train.json"]), "its inputs are a JSON list, not an object"),
    (lambda c: c["inputs"].update(data="train.json"), "its inputs.data is not an object with a "
                                                      "path"),
    (lambda c: c["inputs"]["data"][0].update(path=3), "its inputs.data is not an object with a "
                                                      "path"),
    (lambda c: c["inputs"]["data"][0].update(bytes="big"), "its inputs.data has no size and sha256 "
                                                         "as train_sft.py writes them"),
    (lambda c: c.update(history={"step": 1}), "its history is a JSON object"),
    (lambda c: {"lr": 0.002}, "not a run's settings: it lacks run_format"),
    (lambda c: [c], "a JSON list, not a run's settings"),
])
def test_a_hand_edited_config_is_one_line(saved_run, capsys, edit, problem):
    out, argv = saved_run
    edit_config(out, edit)
    before = files_of(out)
    for resume_flag in (["--resume"], []):
        code, _, err = cli(argv[:-1] + resume_flag, capsys)
        assert_one_line_error(code, err, f"{out / 'config.json'} is damaged ({problem}); restore "
                              "it (it holds the run's settings), or choose another --out")
    assert files_of(out) == before


def test_a_config_json_that_is_a_list_elsewhere_is_named_as_such(train, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text("[1, 2]")
    code, _, err = cli(lora_argv(train, out), capsys)
    assert_one_line_error(code, err, f"--out {out} holds files this project did not write "
                          "(config.json: a JSON list, not a run's settings)")


def test_bad_metrics_rows_are_skipped_with_a_note(saved_run, capsys):
    out, argv = saved_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": "3", "loss": 1.0}\n{"step": 3, "loss": "low"}\n[3, 1.0]\n{"step": 3}\n')
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    assert (f"note: {out / 'metrics.jsonl'}: skipped 3 unreadable lines (lines 3, 4, 5): not rows "
            "of metrics.jsonl (a run killed while writing leaves a torn last line)") in stdout
    assert metrics_steps(out) == [1, 2, 3, 4]  # ({"step": 3} was a row, after the checkpoint)


def test_metrics_that_is_not_a_file_is_one_line(saved_run, capsys):
    out, argv = saved_run
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    before = files_of(out)
    code, _, err = cli(argv, capsys)
    assert_one_line_error(code, err, f"{out / 'metrics.jsonl'} is not a file: a run writes its "
                          "metrics there; move it away, or choose another --out")
    assert files_of(out) == before


# ---------------------------------------------------------------- 4. write errors and paths

def test_a_full_disk_while_appending_metrics_is_one_line_and_loses_nothing(train, tmp_path,
                                                                            straight, monkeypatch,
                                                                            capsys):
    out = tmp_path / "out"
    argv = lora_argv(train, out, "--save-every", 1)
    real_open, rows = open, []

    class HalfWritten:  # writes half the row, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            rows.append(text)
            if len(rows) == 3:
                self.f.write(text[:len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)
    with monkeypatch.context() as m:
        m.setattr(run_metrics, "open", lambda path, mode="r": HalfWritten(real_open(path, mode))
                  if mode == "a" and path.name == "metrics.jsonl" else real_open(path, mode),
                  raising=False)
        code, _, err = cli(argv, capsys)
    assert_one_line_error(code, err, f"cannot write {out / 'metrics.jsonl'}: no space left on "
                          "device; the run stopped, and what it wrote before is kept")
    assert saved_state(out)["step"] == 2
    code, stdout, err = cli(argv + ["--resume"], capsys)
    assert code == 0, err
    assert "skipped 1 unreadable line (line 3)" in stdout
    assert metrics_steps(out) == [1, 2, 3, 4]
    assert_same_weights(out, straight)


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_a_read_only_run_directory_is_one_line(saved_run, monkeypatch, capsys, error):
    """(As root, chmod does not stop a write: the failure is simulated where it would happen.)"""
    out, argv = saved_run
    before = files_of(out)

    def refused(path, write):
        raise OSError(error, os.strerror(error), str(path))
    monkeypatch.setattr(run_dir, "atomic_write", refused)
    monkeypatch.setattr(run_dir, "write_json", lambda path, obj: refused(path, None))
    code, _, err = cli(argv + ["--lr", "1e-3"], capsys)
    assert_one_line_error(code, err, f"cannot write {out / 'config.json'}: {os.strerror(error)}; "
                          "the run stopped, and what it wrote before is kept")
    assert files_of(out) == before


def test_an_out_name_too_long_is_one_line(train, tmp_path, capsys):
    out = tmp_path / ("x" * 300) / "run"
    code, _, err = cli(lora_argv(train, out), capsys)
    assert_one_line_error(code, err, f"cannot use --out {out}: File name too long; choose "
                          "another --out")
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("below", ["", "run"])
def test_an_out_in_a_symlink_loop_is_one_line(train, tmp_path, capsys, below):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    out = loop / below if below else loop
    code, _, err = cli(lora_argv(train, out), capsys)
    assert_one_line_error(code, err, f"--out {out} is a symbolic link that leads back to itself")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# ---------------------------------------------------------------- 5. a start that fails

def test_a_failed_start_leaves_nothing_it_created(train, tmp_path, capsys):
    missing = tmp_path / "nowhere.json"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "Hi"}]')  # no output
    new = tmp_path / "runs" / "a" / "b"
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        code, _, err = cli(lora_argv(bad, out), capsys)
        assert_one_line_error(code, err, f"{bad}: record 1")
    assert not (tmp_path / "runs").exists()  # every folder it made, removed
    assert empty.is_dir() and list(empty.iterdir()) == []  # the folder it found, kept
    code, _, err = cli(lora_argv(missing, new), capsys)
    assert_one_line_error(code, err, f"data file not found: {missing}")
    assert not (tmp_path / "runs").exists()


def test_a_failed_resume_leaves_the_run_as_it_was(saved_run, capsys, monkeypatch):
    out, argv = saved_run
    before = files_of(out)

    def out_of_memory(*args, **kwargs):
        raise UserError("out of memory (simulated)")
    monkeypatch.setattr(train_sft, "load_state", out_of_memory)
    code, _, err = cli(argv + ["--lr", "1e-3", "--max-steps", "8"], capsys)
    assert_one_line_error(code, err, "out of memory (simulated)")
    assert files_of(out) == before  # config.json as it was: no history of a start that failed


def test_a_failed_start_keeps_what_others_put_there(train, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new"

    def someone_writes(*args, **kwargs):
        (out / "notes.txt").write_text("mine")
        raise KeyboardInterrupt  # Ctrl-C while the model loads
    monkeypatch.setattr(train_sft, "build_model", someone_writes)
    code, _, err = cli(lora_argv(train, out), capsys)
    assert code == 130, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_missing_data_file_is_said_before_the_run_in_out(two_steps, tmp_path, capsys):
    out, argv = two_steps
    missing = tmp_path / "typo.json"
    before = files_of(out)
    code, _, err = cli(lora_argv(missing, out), capsys)
    assert_one_line_error(code, err, f"data file not found: {missing}")
    assert files_of(out) == before


def test_a_new_folder_inside_a_models_folder_is_accepted(train, tmp_path, capsys):
    """What docs/errors.md says: --out may not be or hold an input, but a new folder inside the
    model's folder holds none of its files, and the run writes only inside it."""
    model = tmp_path / "mymodel"
    model.mkdir()
    (model / "model.gguf").write_bytes(b"GGUF")  # (prepare_out does not read the model)
    (model / "notes.txt").write_text("the model's")
    before = files_of(model)
    for out, accepted in ((model / "run1", True), (model, False)):
        config = train_sft.parse_args(["--checkpoint", str(model / "model.gguf"), "--data",
                                       str(train), "--out", str(out)])
        if accepted:
            run_dir.prepare_out(config)
            assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]
            run_dir.undo_start(out)  # (as a start that fails takes it back)
        else:
            with pytest.raises(UserError, match=f"--out {model} contains the --checkpoint"):
                run_dir.prepare_out(config)
    assert files_of(model) == before and sorted(p.name for p in model.iterdir()) == [
        "model.gguf", "notes.txt"]
