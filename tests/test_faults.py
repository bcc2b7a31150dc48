"""Faults and mistakes end to end, as a user meets them on the command line.

- kill -9 at random moments (during saves too), then --resume until done: the final weights are
  bit for bit those of an uninterrupted run, and no temporary file is left.
- bench/bench.py: the CPU example of its own docstring runs; every flag has a help text and its
  default; a bad flag is one line.

Everything runs as subprocesses, as a user would (python train_sft.py ...).
"""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, help_blocks
from errors import run_cli

DEMO_RECORDS = json.loads((ROOT / "examples" / "alpaca_demo.json").read_text())


# ---------------------------------------------------------------- kill -9, then --resume

def train_argv(data: Path, out: Path) -> list[str]:
    """The demo model at a small size, saving after every step: 8 steps of 2 examples."""
    flags = ["--checkpoint", "tiny", "--data", data, "--out", out, "--template", "none",
             "--seq-len", 64, "--batch-size", 2, "--val-split", 0, "--warmup-steps", 2,
             "--max-steps", 8, "--save-every", 1, "--eval-every", 100, "--sample-tokens", 2]
    return [sys.executable, "train_sft.py", *map(str, flags)]


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.tmp")] if out.exists() else []


def has_rows(out: Path, n: int) -> bool:
    """metrics.jsonl holds at least n complete lines."""
    try:
        return (out / "metrics.jsonl").read_text().count("\n") >= n
    except FileNotFoundError:
        return False


def wait(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def run(argv):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def kill_when(argv, ready, timeout=60.0) -> bool:
    """Start argv, poll `ready()` every millisecond, then kill -9. False if it ended first."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    return False


def test_kill_9_at_random_moments_then_resume_is_exact(tmp_path):
    rng = random.Random(1234)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(DEMO_RECORDS[:8]))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run(train_argv(data, straight))
    assert done.returncode == 0, done.stderr

    row, delay = rng.randint(3, 5), rng.uniform(0, 0.08)  # a random moment: within a step or a save
    moments = [  # when to kill; the run continues with --resume after each
        ("before the first checkpoint", lambda: (killed / "config.json").exists()),
        ("during a save", lambda: has_rows(killed, 2) and bool(temp_files(killed))),
        ("at a random moment", lambda: has_rows(killed, row) and wait(delay)),
        ("during a later save", lambda: has_rows(killed, 6) and bool(temp_files(killed))),
    ]
    argv = train_argv(data, killed)
    kills, left_behind = [], []
    for name, ready in moments:
        if kill_when(argv, ready):
            kills.append(name)
            left_behind += temp_files(killed)
        argv = train_argv(data, killed) + ["--resume"]  # what a user types after a kill
    assert kills[:2] == ["before the first checkpoint", "during a save"], kills
    assert left_behind  # the saves killed midway left their temporary files
    for attempt in range(3):  # --resume until done
        done = run(argv)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    weights = "model/model.safetensors"
    assert (straight / weights).read_bytes() == (killed / weights).read_bytes()
    rows = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == list(range(1, 9))
    assert temp_files(killed) == []
    assert len(kills) >= 3, kills  # (a moment can pass unseen, polled every millisecond: rarely)


# ---------------------------------------------------------------- bench/bench.py

def test_bench_runs_its_own_cpu_example():
    done = run([sys.executable, "-m", "bench", "--shape", "tiny", "--device", "cpu",
                "--steps", "2"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["shape"] == "tiny" and result["seq_len"] == 512  # tiny's context: less than 2048
    assert result["tokens_per_s"] > 0 and result["loss"] > 0


def bench_in_process(argv, capsys):
    """bench.py's main under run_cli, in-process (its flags are checked before anything runs)."""
    from bench import bench as bench_script
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(bench_script.main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_bench_help_gives_every_flag_a_text_and_its_default(capsys):
    code, out, _ = bench_in_process(["--help"], capsys)
    assert code == 0
    blocks = help_blocks(out)
    assert {"--shape", "--seq-len", "--device", "--steps", "--warmup", "--compile"} <= blocks.keys()
    for flag, block in blocks.items():
        if flag != "-h":
            assert "default" in block, block


def test_bench_lengths_trains_on_batches_of_real_lengths(tmp_path, capsys):
    """--lengths: examples of the file's lengths, batched as train_sft.py batches them; tokens/s
    counts real tokens, and the padding shows in real_token_share."""
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"examples": [[10, 4, 5], [20, 8, 11], [7, 3, 3], [30, 10, 19],
                                                [12, 5, 6], [25, 9, 15]]}))
    share = {}
    for flags in ([], ["--pad-to-multiple-of", "16"], ["--packing"]):
        argv = ["--shape", "tiny", "--device", "cpu", "--batch-size", "2", "--grad-accum", "3",
                "--steps", "1", "--warmup", "0", "--lengths", str(lengths), *flags]
        from bench import bench as bench_script
        capsys.readouterr()
        bench_script.main(argv)
        result = json.loads(capsys.readouterr().out)
        assert result["tokens_per_s"] > 0 and result["seq_len"] == 512
        share[tuple(flags)] = result["real_token_share"]
    # grouped by length, batches of 2: (30, 25) (20, 12) (10, 7) -> 104 of 120 positions
    assert share[()] == round(104 / 120, 4)
    assert share[("--pad-to-multiple-of", "16")] == round(104 / (2 * (32 + 32 + 16)), 4)
    assert share[("--packing",)] == 1.0  # one row of 104 tokens
    lengths.write_text("[1, 2]")
    code, out, err = bench_in_process(["--device", "cpu", "--lengths", str(lengths)], capsys)
    assert (code, out) == (2, "") and err.startswith(f"error: --lengths {lengths}: not a lengths "
                                                     "file of bench/alpaca_lengths.py")


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a device (use cpu, cuda, cuda:N or "
                           "mps)"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--shape", "tiny", "--seq-len", "600"], "--seq-len 600 is longer than tiny's context (512)"),
    (["--prompt-frac", "1"], "argument --prompt-frac: must be a number in [0, 1), got 1"),
    (["--adamw-state", "bf16"], "--adamw-state bf16 is for --method full with float32 weights, "
                                "in one process"),
])
def test_bench_bad_flags_are_one_line(flags, message, capsys):
    cpu = [] if "--device" in flags else ["--device", "cpu"]
    assert bench_in_process(cpu + flags, capsys) == (2, "", f"error: {message}\n")
