"""train_sft.py under torchrun (FSDP2, gloo on CPU): two ranks must train exactly what one process
trains with the same global batch, and a checkpoint written by two ranks must resume exactly.

One process with --grad-accum 2 and two ranks with --grad-accum 1 consume the same micro-batches
per optimizer step (two), so their losses and weights agree to float32 rounding."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, shared_path

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def train(out, *args, ranks=1):
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(ROOT / "train_sft.py"), "--out", str(out), *map(str, args)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    # on failure, show what the ranks said (torchrun's own summary comes last and hides it)
    rank_lines = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, (rank_lines or proc.stderr)[-4000:]
    return proc


def losses(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [row["loss"] for row in rows if "loss" in row]


def assert_same_tensors(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


def lora_args(*extra):
    return ["--checkpoint", shared_path("models", "stories260K"),
            "--data", shared_path("data", "litgpt_fixture_alpaca.json"),
            "--val-split", 0, "--seq-len", 128, "--batch-size", 2, "--save-every", 2,
            "--sample-tokens", 2, *extra]


def test_two_ranks_train_what_one_process_trains(tmp_path):
    """LoRA on the real stories260K, and full fine-tuning of the demo model."""
    full_args = ["--val-split", 0, "--batch-size", 4, "--max-steps", 4, "--save-every", 2,
                 "--sample-tokens", 2]
    for name, args in (("lora", lora_args("--max-steps", 4, "--lora-dropout", 0)),
                       ("full", full_args)):
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        train(one, *args, "--grad-accum", 2)
        log = train(two, *args, "--grad-accum", 1, ranks=2).stdout
        assert "× 2 ranks" in log and log.count("model:") == 1  # one rank speaks
        assert losses(two) == pytest.approx(losses(one), rel=1e-5)
        weights = "adapter/adapter.safetensors" if name == "lora" else "model/model.safetensors"
        assert_same_tensors(load_file(one / weights), load_file(two / weights), tol=1e-5)


def test_a_checkpoint_of_two_ranks_resumes_exactly(tmp_path):
    """4 steps in one go, or 2 steps + --resume for 2 more (dropout on, so each rank's RNG state
    must come back too). During warmup the learning rate does not depend on --max-steps."""
    args = lora_args("--grad-accum", 1, "--lora-dropout", 0.1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *args, "--max-steps", 4, ranks=2)
    train(resumed, *args, "--max-steps", 2, ranks=2)
    train(resumed, *args, "--max-steps", 4, "--resume", ranks=2)
    assert losses(resumed) == losses(straight)
    assert_same_tensors(load_file(straight / "adapter/adapter.safetensors"),
                        load_file(resumed / "adapter/adapter.safetensors"), tol=0.0)
    # and resuming with another number of ranks is refused, naming the setting
    command = [sys.executable, str(ROOT / "train_sft.py"), "--out", str(resumed), *map(str, args),
               "--max-steps", "6", "--resume"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "world_size 2 → 1" in proc.stderr
