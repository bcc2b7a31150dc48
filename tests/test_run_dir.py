"""run/run_dir.py and checkpoint.atomic_write: a run never destroys what it did not write, never
dead-ends, and every mistake or fault around its directory is one line.

1. An --out that is, holds or contains a model, data or others' files: refused, nothing written.
2. A run that stopped before its first checkpoint starts over (with or without --resume).
3. A damaged checkpoint.pt or config.json: one line naming it; a torn metrics line is skipped.
4. A full disk during a save: one line, the previous file kept, no temporary file left.
5. --resume compares resolved paths, what the data files hold, and every setting that changes
   the weights.
6. Temporary files of interrupted saves are removed on start; two runs never share one --out.

Runs call train_sft.main in-process on a tiny demo setting (about a second each).
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import lora
from run import resume
from run import run_dir
import train_sft
from formats.adapter import save_adapter
from formats.files import atomic_write
from conftest import ROOT, run_script, shared_path
from errors import UserError
from model import ModelConfig, Transformer

DEMO_RECORDS = json.loads((ROOT / "examples" / "alpaca_demo.json").read_text())
# What torch.save and safetensors raise when the disk fills (seen on a full 1 MiB tmpfs).
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


# ---------------------------------------------------------------- helpers

@pytest.fixture
def train(tmp_path) -> Path:
    """8 short demo records, in a folder of their own (never inside an --out)."""
    path = tmp_path / "data" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(DEMO_RECORDS[:8]))
    return path


def demo_argv(train, out, *extra) -> list[str]:
    """The demo model, small: 4 micro-batches of 2 an epoch, 2 steps, saved only at the end."""
    argv = ["--checkpoint", "tiny", "--data", train, "--out", out, "--template", "none",
            "--seq-len", 64, "--batch-size", 2, "--grad-accum", 1, "--val-split", 0,
            "--warmup-steps", 1, "--max-steps", 2, "--save-every", 100, "--sample-tokens", 2,
            *extra]  # (short sample answers: a fast test)
    return [str(a) for a in argv]


def cli(argv, capsys, main=train_sft.main):
    return run_script(main, argv, capsys)


def assert_one_line_error(code, err, *expected):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, err


def files_of(directory: Path) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def crashed_run(monkeypatch, argv, step: int):
    """Run argv until its step-th train_step raises (a crash in the middle of the run)."""
    real, calls = train_sft.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(train_sft, "train_step", flaky)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_sft.main(argv)


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_model(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


# ---------------------------------------------------------------- 1. only into what a run writes

@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A copy of the real stories260K folder (the shared one is read-only: it would hide harm)."""
    d = tmp_path / "stories260K"
    shutil.copytree(shared_path("models", "stories260K"), d)
    return d


def stories_argv(model, out, *extra) -> list[str]:
    data = shared_path("data", "litgpt_fixture_alpaca.json")
    argv = ["--checkpoint", model, "--data", data, "--out", out, "--seq-len", 128,
            "--batch-size", 2, "--val-split", 0, "--max-steps", 1, "--sample-tokens", 2, *extra]
    return [str(a) for a in argv]


def test_out_that_is_the_checkpoint_is_refused(model_dir, monkeypatch, capsys):
    before = files_of(model_dir)
    code, _, err = cli(stories_argv(model_dir, model_dir), capsys)
    assert_one_line_error(code, err, f"--out {model_dir} is the --checkpoint {model_dir}",
                          "choose another --out")
    monkeypatch.chdir(model_dir)  # `--out .` inside the model's folder, named another way
    code, _, err = cli(stories_argv("../stories260K", "."), capsys)
    assert_one_line_error(code, err, "--out . is the --checkpoint ../stories260K")
    code, _, err = cli(stories_argv("stories260K.bin", "."), capsys)  # a checkpoint file inside
    assert_one_line_error(code, err, "--out . contains the --checkpoint stories260K.bin")
    assert files_of(model_dir) == before  # not even a lock file


def test_out_that_contains_the_data_is_refused(train, tmp_path, capsys):
    before = files_of(train.parent)
    code, _, err = cli(demo_argv(train, train.parent), capsys)
    assert_one_line_error(code, err, f"--out {train.parent} contains the --data {train}")
    val = tmp_path / "val" / "v.json"
    val.parent.mkdir()
    val.write_text(json.dumps(DEMO_RECORDS[8:11]))
    code, _, err = cli(demo_argv(train, val.parent, "--val-data", val), capsys)
    assert_one_line_error(code, err, f"--out {val.parent} contains the --val-data {val}")
    assert files_of(train.parent) == before and os.listdir(val.parent) == ["v.json"]


@pytest.mark.parametrize("name, content", [
    ("notes.txt", "my notes"),
    ("config.json", '{"model_type": "llama", "hidden_size": 64}'),  # a Hugging Face model's
    ("config.json", "not json"),
])
def test_out_holding_others_files_is_refused(train, tmp_path, capsys, name, content):
    out = tmp_path / "somebody"
    out.mkdir()
    (out / name).write_text(content)
    for resume_flag in ([], ["--resume"]):
        code, _, err = cli(demo_argv(train, out, *resume_flag), capsys)
        assert_one_line_error(code, err, f"--out {out} holds files this project did not write "
                                         f"({name}")  # (config.json: what it is instead)
    assert os.listdir(out) == [name]


def test_a_new_run_directory_is_marked_as_ours(train, tmp_path):
    out = tmp_path / "out"
    train_sft.main(demo_argv(train, out))
    config = json.loads((out / "config.json").read_text())
    assert config["run_format"] == 1
    assert config["inputs"]["data"] == [{"path": str(train.resolve()),
                                         "bytes": train.stat().st_size,
                                         "sha256": resume.sha256_of(train)}]
    assert config["lr"] == 2e-3 and config["out"] == str(out)  # the settings themselves, as before


def test_a_run_directory_of_the_previous_version_is_still_ours(train, tmp_path, monkeypatch,
                                                                capsys):
    out = tmp_path / "out"
    argv = demo_argv(train, out, "--max-steps", 4, "--save-every", 2)
    crashed_run(monkeypatch, argv, step=3)
    config = json.loads((out / "config.json").read_text())
    today = {k: v for k, v in config.items() if k not in ("run_format", "inputs")}
    (out / "config.json").write_text(json.dumps(today))
    code, _, err = cli(argv + ["--resume"], capsys)
    assert code == 0, err
    assert metrics_steps(out) == [1, 2, 3, 4]


def test_a_directory_with_only_our_leftovers_counts_as_empty(train, tmp_path):
    out = tmp_path / "out"  # killed after taking the lock, while writing config.json
    out.mkdir()
    (out / ".lock").write_text("12345\n")
    (out / ".config.json.abcd1234.tmp").write_text("{")
    train_sft.main(demo_argv(train, out))
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pt", "config.json", "metrics.jsonl",
                                       "model", "report.html", "report.md", "samples.jsonl",
                                       "token_losses.jsonl"]


# ---------------------------------------------------------------- 2. no dead ends

def test_a_run_that_stopped_before_its_first_checkpoint_starts_over(train, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "out"
    crashed_run(monkeypatch, demo_argv(train, out, "--max-steps", 3), step=2)
    assert metrics_steps(out) == [1] and not (out / "checkpoint.pt").exists()
    other_lr = demo_argv(train, out, "--max-steps", 3, "--lr", 1e-3)  # other settings are fine too
    code, stdout, err = cli(other_lr, capsys)
    assert code == 0, err
    assert (f"note: {out} holds a run that stopped before its first checkpoint; starting it over"
            in stdout.splitlines())
    assert metrics_steps(out) == [1, 2, 3]  # the old row is gone
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3


def test_resume_without_a_checkpoint_starts_from_step_0(train, tmp_path, monkeypatch, capsys):
    straight, out = tmp_path / "straight", tmp_path / "out"
    train_sft.main(demo_argv(train, straight, "--max-steps", 3))
    crashed_run(monkeypatch, demo_argv(train, out, "--max-steps", 3), step=3)
    code, stdout, err = cli(demo_argv(train, out, "--max-steps", 3, "--resume"), capsys)
    assert code == 0, err
    notes = [line for line in stdout.splitlines() if "no checkpoint" in line]
    assert notes == [f"--resume: {out} has no checkpoint yet (the run stopped before its first "
                     "save); starting from step 0"]
    assert metrics_steps(out) == [1, 2, 3]
    for name, weight in saved_model(straight).items():
        assert torch.equal(saved_model(out)[name], weight), name


def test_ctrl_c_while_loading_leaves_no_dead_end(train, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):  # Ctrl-C while the model loads
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train_sft, "build_model", interrupted)
        code, _, err = cli(demo_argv(train, out), capsys)
    assert code == 130
    for argv in (demo_argv(train, out), demo_argv(train, out, "--resume")):
        code, _, err = cli(argv, capsys)
        assert code == 0, err
        (out / "checkpoint.pt").unlink()  # back to a run without a checkpoint, for the next one
        shutil.rmtree(out / "model")


def test_a_finished_run_without_its_checkpoint_is_not_overwritten(train, tmp_path, capsys):
    out = tmp_path / "out"
    train_sft.main(demo_argv(train, out))
    (out / "checkpoint.pt").unlink()  # deleted to save space: the model is what is left of the run
    before = files_of(out)
    for resume_flag in ([], ["--resume"]):
        code, _, err = cli(demo_argv(train, out, *resume_flag), capsys)
        assert_one_line_error(code, err, f"{out} holds the results of a finished run (model)",
                              "choose another --out")
    assert files_of(out) == before


# ---------------------------------------------------------------- 3. damaged files

@pytest.fixture
def saved_run(train, tmp_path, monkeypatch):
    """A run of 4 steps that crashed at step 3: checkpoint.pt at step 2, metrics rows 1 and 2."""
    out = tmp_path / "out"
    argv = demo_argv(train, out, "--max-steps", 4, "--save-every", 2)
    crashed_run(monkeypatch, argv, step=3)
    return out, argv


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_resume_from_a_damaged_checkpoint_is_one_line(saved_run, capsys, damage):
    out, argv = saved_run
    path = out / "checkpoint.pt"
    good = path.read_bytes()
    bad = {"truncated": good[:len(good) // 2], "random bytes": os.urandom(5000),
           "empty": b""}[damage]
    path.write_bytes(bad)
    code, _, err = cli(argv + ["--resume"], capsys)
    assert_one_line_error(code, err, f"--resume: {path} is damaged",
                          "delete it to start this run over from step 0")
    assert path.read_bytes() == bad


def test_resume_from_a_checkpoint_that_is_not_ours_is_one_line(saved_run, capsys):
    out, argv = saved_run
    torch.save({"weights": torch.zeros(3)}, out / "checkpoint.pt")  # readable, not a training state
    code, _, err = cli(argv + ["--resume"], capsys)
    assert_one_line_error(code, err, f"--resume: {out / 'checkpoint.pt'} is damaged")


def test_load_state_reports_a_damaged_checkpoint_too(saved_run):
    out, _ = saved_run
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="is damaged"):
        run_dir.load_state(out, model, torch.optim.AdamW(model.parameters()), None)


def test_resume_with_a_damaged_config_is_one_line(saved_run, capsys):
    out, argv = saved_run
    (out / "config.json").write_text('{"out": "x", "lr": 0.0')  # cut short
    code, _, err = cli(argv + ["--resume"], capsys)
    assert_one_line_error(code, err, f"{out / 'config.json'} is damaged (not readable JSON:",
                          "restore it", "choose another --out")
    assert (out / "config.json").read_text() == '{"out": "x", "lr": 0.0'


def test_resume_skips_a_torn_metrics_line(saved_run, capsys):
    out, argv = saved_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.71')  # killed in the middle of an append
    code, stdout, err = cli(argv + ["--resume"], capsys)
    assert code == 0, err
    assert f"note: {out / 'metrics.jsonl'}: skipped 1 unreadable line (line 3)" in stdout
    assert metrics_steps(out) == [1, 2, 3, 4]


# ---------------------------------------------------------------- 4. a full disk

@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError(SAFETENSORS_DISK_FULL)])
def test_disk_full_is_one_line_and_keeps_the_previous_file(tmp_path, error):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous checkpoint")

    def half_then_full(tmp):
        Path(tmp).write_bytes(b"half a fi")
        raise error
    with pytest.raises(UserError) as info:
        atomic_write(path, half_then_full)
    assert str(info.value) == (f"no space left on device while writing {path}; "
                               f"the previous {path} is kept")
    assert path.read_bytes() == b"the previous checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # the temporary file is gone


@pytest.mark.parametrize("message", [
    TORCH_DISK_FULL,
    "basic_ios::clear: iostream error",
    "PytorchStreamWriter failed writing file data/0: file write failed",
])
def test_a_failed_torch_write_is_one_line(tmp_path, message):
    path = tmp_path / "new.pt"

    def torch_fails(tmp):
        raise RuntimeError(message)
    with pytest.raises(UserError) as info:
        atomic_write(path, torch_fails)
    assert str(info.value) == (f"a write failed, most likely for lack of disk space (torch: "
                               f"{message}) while writing {path}; nothing was written")
    assert os.listdir(tmp_path) == []


def test_other_write_errors_keep_their_traceback(tmp_path):
    for error in (ValueError("a bug"), RuntimeError("something else"), OSError(errno.EACCES, "no")):
        def fails(tmp):
            raise error
        with pytest.raises(type(error), match=str(error.args[-1])):
            atomic_write(tmp_path / "f", fails)
    assert os.listdir(tmp_path) == []


def test_disk_full_during_a_training_save_is_one_line(train, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_save, saves = torch.save, []

    def full_on_second_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError(TORCH_DISK_FULL)
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_on_second_save)
    code, _, err = cli(demo_argv(train, out, "--max-steps", 4, "--save-every", 1), capsys)
    path = out / "checkpoint.pt"
    assert_one_line_error(code, err, f"while writing {path}; the previous {path} is kept")
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_writing_the_adapter_is_one_line(tmp_path, monkeypatch):
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, vocab_size=16,
                         max_seq_len=8)
    model = Transformer(config)
    lora.apply_lora(model, "q,v", r=2)

    def full(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_DISK_FULL)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    adapter = tmp_path / "adapter"
    with pytest.raises(UserError) as info:
        save_adapter(model, adapter)
    assert str(info.value) == (f"no space left on device while writing "
                               f"{adapter / 'adapter.safetensors'}; nothing was written")
    assert os.listdir(adapter) == []


# ---------------------------------------------------------------- 5. what --resume compares

def test_every_setting_is_either_compared_or_free_on_resume():
    settings = set(resume.flat_settings(resume.settings_of(train_sft.parse_args([]))))
    must, free = set(resume.RESUME_MUST_MATCH), set(resume.RESUME_MAY_DIFFER)
    going_on = set(resume.RESUME_GOES_ON_WITH)
    assert not must & free and not must & going_on and not free & going_on
    everything = must | free | going_on
    assert settings == everything, f"classify: {sorted(settings ^ everything)}"
    assert {"precision", "weight_decay", "loss_chunk", "lora_r", "lora_rslora", "lora_dora",
            "seq_len", "packing", "seed", "data", "val_data", "checkpoint", "world_size"} <= must
    # "train it longer", "go on with a lower --lr" (with a note: see test_run_faults.py)
    assert going_on == {"epochs", "max_steps", "lr", "warmup_steps", "grad_clip"}


def test_resume_accepts_the_same_data_by_another_path(saved_run, train, tmp_path, monkeypatch,
                                                      capsys):
    out, argv = saved_run
    (train.parent / "link.json").symlink_to(train)
    shutil.copy(train, tmp_path / "copy.json")  # another file, the same records: the same run
    monkeypatch.chdir(train.parent)
    for other in ("train.json", "./../data/train.json", "link.json", str(tmp_path / "copy.json")):
        same_data = [other if a == str(train) else a for a in argv]
        config = train_sft.parse_args(same_data + ["--resume"])
        config.world_size = 1  # (main sets it)
        run_dir.prepare_out(config)
    code, _, err = cli([("link.json" if a == str(train) else a) for a in argv] + ["--resume"],
                       capsys)
    assert code == 0, err
    assert metrics_steps(out) == [1, 2, 3, 4]


def test_resume_refuses_data_whose_content_changed(saved_run, train, capsys):
    out, argv = saved_run
    train.write_text(json.dumps(DEMO_RECORDS[1:9]))  # same path, other records
    before = (out / "config.json").read_bytes()
    code, _, err = cli(argv + ["--resume"], capsys)
    assert_one_line_error(code, err, f"data {str(train)!r} changed since the run started")
    assert (out / "config.json").read_bytes() == before


def test_resume_names_every_changed_setting_and_keeps_the_config(saved_run, capsys):
    out, argv = saved_run
    before = (out / "config.json").read_bytes()
    changed = ["--lr", "1e-3", "--precision", "bf16", "--weight-decay", "0.1"]
    code, _, err = cli(argv + changed + ["--resume"], capsys)
    assert_one_line_error(code, err, f"--resume: {out} was trained with different settings: ",
                          "settings: weight_decay 0.0 → 0.1, precision 'fp32' → 'bf16'; ")
    assert (out / "config.json").read_bytes() == before  # a refused resume rewrites nothing


def test_resume_accepts_settings_that_do_not_change_the_weights(saved_run, capsys):
    out, argv = saved_run
    free = ["--eval-every", "1", "--save-every", "3", "--sample-prompt", "Hi", "--grad-ckpt",
            "--device", "cpu"]
    code, _, err = cli(argv + free + ["--resume"], capsys)  # (the last --save-every counts)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["eval_every"] == 1 and config["grad_ckpt"] and config["save_every"] == 3


# ---------------------------------------------------------------- 6. leftovers and collisions

def test_stale_temporary_files_are_removed_on_start(saved_run, capsys):
    out, argv = saved_run
    (out / ".checkpoint.pt.k3j_x9a2.tmp").write_bytes(b"x" * 1000)  # a save killed with -9
    (out / "model").mkdir()
    (out / "model" / ".model.safetensors.abcd1234.tmp").write_bytes(b"y")
    (out / "notes.tmp").write_text("mine")  # not named like ours: kept
    (out / ".hidden.tmp").write_text("mine")
    code, stdout, err = cli(argv + ["--resume"], capsys)
    assert code == 0, err
    assert "note: removed 2 temporary files left by interrupted saves" in stdout
    assert not (out / ".checkpoint.pt.k3j_x9a2.tmp").exists()
    assert not (out / "model" / ".model.safetensors.abcd1234.tmp").exists()
    assert (out / "notes.tmp").read_text() == (out / ".hidden.tmp").read_text() == "mine"


HOLD_OUT = """import sys, train_sft
from run import run_dir
run_dir.prepare_out(train_sft.parse_args(sys.argv[1:]))
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_second_run_into_the_same_out_is_refused(train, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUT, *demo_argv(train, out)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        before = files_of(out)
        for argv in (demo_argv(train, out), demo_argv(train, out, "--resume")):
            code, _, err = cli(argv, capsys)
            assert_one_line_error(code, err, f"another run is using {out} (pid {holder.pid})")
        assert files_of(out) == before
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli(demo_argv(train, out), capsys)  # the OS let go of the killed process's lock
    assert code == 0, err


def test_resume_may_train_longer_and_says_so(saved_run, capsys):
    """--max-steps (or --epochs) may change on --resume: the run goes on from its checkpoint, and
    a note says that the schedule now ends at the new length."""
    out, argv = saved_run
    code, stdout, err = cli(argv + ["--max-steps", "6", "--resume"], capsys)
    assert code == 0, err
    assert ("note: --resume from step 2 with --max-steps 4 → 6 (the learning rate's cosine now "
            "ends at the new length): from here the run is not bit for bit the one it would have "
            "been uninterrupted; config.json keeps the history") in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
