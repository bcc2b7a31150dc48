"""sources.py and batching.StepBatches: several --data mixed by weight, each epoch its own sample,
the same for the same seed; PATH:WEIGHT read as the user meant it."""
import json
import math
from collections import Counter

import pytest

from batching import StepBatches, make_batches
from config import parse_args
from errors import UserError
from records import parse_source
from run import resume
from sources import Mix, source_counts
from test_run_dir import DEMO_RECORDS, assert_one_line_error, cli, demo_argv


def test_path_and_weight(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("a.json") == ("a.json", None)
    assert parse_source("b.parquet:0.3") == ("b.parquet", 0.3)
    assert parse_source("dir/b.parquet:1") == ("dir/b.parquet", 1.0)
    (tmp_path / "odd:0.5").write_text("[]")  # a file whose name has a colon is that file
    assert parse_source("odd:0.5") == ("odd:0.5", None)
    assert parse_source("odd:0.5:0.25") == ("odd:0.5", 0.25)
    assert parse_source("notes:draft.json") == ("notes:draft.json", None)  # (not found, later)


@pytest.mark.parametrize("text, message", [
    ("b.json:0", "--data b.json:0: the weight after ':' must be a number in (0, 1], the share of "
                 "every epoch drawn from b.json; got '0'"),
    ("b.json:1.5", "must be a number in (0, 1]"),
    ("b.json:-0.2", "must be a number in (0, 1]"),
    ("b.json:nan", "must be a number in (0, 1]"),
    ("b.json:.", "got '.'"),
    ("b.json:", "got ''"),
    (":0.5", "--data :0.5: no file before the weight"),
])
def test_bad_weights_are_one_line_errors(text, message):
    with pytest.raises(UserError) as error:
        parse_source(text)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"^argument --data: "):  # train_sft.py's flag
        parse_args(["--checkpoint", "tiny", "--data", text])


def test_repeated_data_keeps_every_source():
    config = parse_args(["--checkpoint", "tiny", "--data", "a.json", "--data", "b.json:0.3"])
    assert config.data == ["a.json", "b.json:0.3"]
    assert parse_args(["--checkpoint", "tiny"]).data == parse_args([]).data  # the demo's file


def test_counts_follow_the_definition():
    # no weights: every example once, as with one file
    assert source_counts([700, 300], [None, None], ["a", "b"]) == [700, 300]
    # b is 30% of each epoch of 1000; a takes the rest
    assert source_counts([700, 300], [None, 0.3], ["a", "b"]) == [700, 300]
    assert source_counts([900, 100], [None, 0.3], ["a", "b"]) == [700, 300]
    # the unweighted share the rest by size; the counts add up to the epoch (largest remainder)
    assert source_counts([500, 400, 101], [0.5, None, None], ["a", "b", "c"]) == [500, 400, 101]
    assert source_counts([10, 10, 10], [None, None, 0.5], ["a", "b", "c"]) == [8, 7, 15]
    assert source_counts([60, 40], [0.25, 0.75], ["a", "b"]) == [25, 75]


@pytest.mark.parametrize("weights, message", [
    ([0.7, 0.6], "the --data weights add up to 1.3, over 1"),
    ([0.5, 0.3], "the --data weights add up to 0.8; when every file has one they must add up to 1"),
    ([None, 1.0], "the --data weights add up to 1, which leaves nothing for a"),
])
def test_weights_that_cannot_be_shares_are_one_line(weights, message):
    with pytest.raises(UserError, match="^" + message):
        source_counts([10, 10], weights, ["a", "b"])
    flags = [f"a:{weights[0]}" if weights[0] else "a", f"b:{weights[1]}"]
    with pytest.raises(UserError, match="^" + message):  # said by train_sft.py's flags
        parse_args(["--checkpoint", "tiny", "--data", flags[0], "--data", flags[1]])


def test_each_epoch_draws_its_counts_reproducibly():
    big = [("big", i) for i in range(100)]
    small = [("small", i) for i in range(10)]
    counts = source_counts([100, 10], [None, 0.5], ["big", "small"])
    assert counts == [55, 55]
    mix = Mix([big, small], counts, seed=3)
    epochs = [mix.epoch(e) for e in range(3)]
    for examples in epochs:
        per_source = Counter(name for name, _ in examples)
        assert per_source == {"big": 55, "small": 55}
        drawn = Counter(examples)
        assert all(drawn[("small", i)] in (5, 6) for i in range(10))  # 5 whole copies + 5 more
        assert all(drawn[("big", i)] <= 1 for i in range(100))  # without replacement
    assert epochs[0] != epochs[1]  # another sample each epoch
    assert Mix([big, small], counts, seed=3).epoch(1) == epochs[1]  # the same for the same seed
    assert Mix([big, small], counts, seed=4).epoch(1) != epochs[1]
    assert Mix([big, small], [100, 10], seed=3).epoch(2) == big + small  # no weights: all, once


def examples_of_lengths(lengths, tag):
    return [([tag] * n, [tag] * n) for n in lengths]


@pytest.mark.parametrize("packing", [False, True])
def test_step_batches_follow_epochs_of_different_sizes(packing):
    """A weighted mix with --packing: each epoch's sample packs into its own number of rows. The
    micro-batches of the run are the epochs' batches one after another, and a run resumed at any
    step (a new StepBatches) gets the same."""
    short = examples_of_lengths([3] * 40, 1)
    long = examples_of_lengths([5, 6, 7, 8, 9, 10, 11, 12, 13, 14] * 3, 2)
    mix = Mix([short, long], source_counts([40, 30], [0.2, None], ["s", "l"]), seed=2)
    options = dict(pad_id=0, max_seq_len=16, packing=packing, seed=1)
    counts = [len(make_batches(mix.epoch(e), 2, epoch=e, **options)) for e in range(4)]
    if packing:
        assert len(set(counts)) > 1  # (the case this is for)
    whole = StepBatches(mix.epoch, 2, 1, **options)
    run = [whole.micro_batch(i) for i in range(sum(counts))]
    expected = [batch for e in range(4) for batch in make_batches(mix.epoch(e), 2, epoch=e,
                                                                  **options)]
    assert len(run) == len(expected) and all(
        (a["tokens"] == b["tokens"]).all() for a, b in zip(run, expected))
    resumed = StepBatches(mix.epoch, 2, 1, **options)
    i = sum(counts[:2]) + 1  # inside epoch 2
    assert (resumed.micro_batch(i)["tokens"] == expected[i]["tokens"]).all()
    assert math.isclose(whole.per_epoch, counts[0])


# ── A run of two sources: config.json, --resume ────────────────────────────────────────

def test_a_mixed_run_records_its_sources_and_resume_checks_each(tmp_path, capsys):
    """Two files, the second a CSV weighted 0.5: config.json says what each gave; --resume
    refuses another weight, another content of the second file, or one source fewer."""
    first = tmp_path / "data" / "a.json"
    first.parent.mkdir()
    first.write_text(json.dumps(DEMO_RECORDS[:12]))
    second = tmp_path / "data" / "b.csv"
    second.write_text("instruction,output\n" + "".join(f"Say {i}.,{i}\n" for i in range(4)))
    out = tmp_path / "out"
    argv = demo_argv(first, out, "--data", f"{second}:0.5", "--val-split", 0.25)
    code, printed, err = cli(argv, capsys)
    assert code == 0, err
    assert f"read 4 records as Alpaca from {second}" in printed
    assert f"mix per epoch: 6 from {first}, 6 from {second}" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == [str(first), f"{second}:0.5"]
    assert [entry.get("weight") for entry in config["inputs"]["data"]] == [None, 0.5]
    assert config["inputs"]["data"][1]["sha256"] == resume.sha256_of(second)
    assert config["data_sources"] == [
        {"data": str(first), "records": 12, "train": 9, "validation": 3, "examples": 9,
         "per_epoch": 6},
        {"data": f"{second}:0.5", "records": 4, "train": 3, "validation": 1, "examples": 3,
         "per_epoch": 6}]
    more = ["--max-steps", 4, "--resume"]
    code, _, err = cli(demo_argv(first, out, "--data", f"{second}:0.4", "--val-split", 0.25,
                                 *more), capsys)
    assert_one_line_error(code, err, f"data '{second}:0.5' → '{second}:0.4'")
    code, _, err = cli(demo_argv(first, out, "--val-split", 0.25, *more), capsys)
    assert_one_line_error(code, err, f"data {[str(first), f'{second}:0.5']!r} → {str(first)!r}")
    second.write_text(second.read_text() + "Say 9.,9\n")
    code, _, err = cli([str(a) for a in argv + more], capsys)
    assert_one_line_error(code, err, f"data '{second}:0.5' changed since the run started")
