"""What `python train_sft.py --data alpaca.json`, typed as a user types it, trains: the model it
picks when --checkpoint is left out, how that model is fetched and cached (default_model.py), and
the sample answered at each evaluation, whose prompt is cut like a training example.
"""
import json

import data
import train_sft
from checkpoint import load_checkpoint
from config import DEMO_CONFIG
from conftest import ROOT
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
    argv = ["--data", train, "--val-data", val, "--out", out,
            "--template", "none", "--seq-len", 64, "--batch-size", 4, "--max-steps", 1]
    train_sft.main([str(a) for a in argv])
    prompt = data.encode_prompt(LONG_RECORD, ByteTokenizer(), data.get_template("none"))
    assert len(prompt) == 337  # BOS and 336 bytes: longer than --seq-len 64
    printed = capsys.readouterr().out
    assert ("note: the sample prompt has 337 tokens; answering its first 63 (--seq-len 64, less "
            "the first answer token), as training examples are cut") in printed
    assert printed.count("  sample: ") == 2  # at step 0 and at the last step
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" in line]
    assert [row["step"] for row in evaluations] == [0, 1]
    assert load_checkpoint(out / "model")[0].config == DEMO_CONFIG


def test_the_sample_prompt_ids_are_the_first_of_the_prompt(tmp_path):
    tok, template = ByteTokenizer(), data.get_template("none")

    class Quiet:
        def say(self, text):
            pass
    prompt = data.encode_prompt(LONG_RECORD, tok, template)
    assert train_sft.sample_prompt_ids(LONG_RECORD, tok, template, 64, Quiet()) == prompt[:63]
    # one that fits is left whole, even when it and a single answer token fill --seq-len exactly
    short = DEMO_RECORDS[0]
    whole = data.encode_prompt(short, tok, template)
    assert train_sft.sample_prompt_ids(short, tok, template, len(whole) + 1, Quiet()) == whole
