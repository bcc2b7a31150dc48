"""The knobs SFT papers turn: NEFTune (neftune.py, --neftune-alpha) and the best adapter by
held-out loss with early stopping (run/best.py: out/best/, --early-stop).

What is checked: the noise is the one transformers' NEFTune hook adds, and only while training
(not in evaluation, not in generation); out/best/ holds the weights of the step with the lowest
logged held-out loss, survives a crash while it is replaced and a --resume, and generate.py reads
it; --early-stop stops where the logged losses say it should.
"""
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import train_sft
from config import TrainConfig
from data import encode_prompt
from errors import UserError, run_cli
from formats.checkpoint import load_checkpoint
from generate import generate
from generate import main as generate_main
from model import ModelConfig, Transformer
from neftune import add_neftune
from run import best as best_dir
from run import training_run
from run.best import BestKeeper, keep_best
from templates import get_template
from test_train import (DEMO_RECORDS, assert_same_tensors, crash_then_resume, demo_argv, metrics,
                        run, saved_state, train_losses, write_records)
from tokenizer import ByteTokenizer

ALPHA = 5.0  # the paper's


def small_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                         vocab_size=ByteTokenizer.vocab_size, max_seq_len=32)
    model = Transformer(config)
    model.init_weights()
    return model


def record_embeddings(model) -> list:
    """(tokens, what the embedding gave the blocks) of every forward pass from now on: a hook
    registered after NEFTune's sees its output."""
    seen = []
    model.embed_tokens.register_forward_hook(lambda module, inputs, output:
                                             seen.append((inputs[0], output.detach())))
    return seen


# ---------------------------------------------------------------- NEFTune

def test_neftune_adds_the_noise_transformers_adds():
    from transformers.integrations.neftune import neftune_post_forward_hook
    model = small_model()
    tokens = torch.randint(0, 258, (3, 11))
    clean = model.embed_tokens(tokens).detach()

    handle = add_neftune(model, ALPHA)
    torch.manual_seed(1)
    ours = model.embed_tokens(tokens).detach()
    handle.remove()
    model.embed_tokens.neftune_noise_alpha = ALPHA
    model.embed_tokens.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(1)
    theirs = model.embed_tokens(tokens).detach()

    torch.testing.assert_close(ours, theirs)  # (their scale is a float32 tensor, ours a double)
    noise = ours - clean
    bound = ALPHA / math.sqrt(11 * 32)  # L = 11 positions, d = 32
    assert bound * 0.95 < noise.abs().max() <= bound
    assert abs(noise.mean()) < bound / 10  # centred: Uniform(-bound, bound)


def test_neftune_noise_only_while_training():
    model = small_model()
    add_neftune(model, ALPHA)
    seen = record_embeddings(model)
    tokens = torch.randint(0, 258, (2, 9))

    model.train()
    model(tokens)
    (tokens_in, output), = seen
    assert not torch.allclose(output, F.embedding(tokens_in, model.embed_tokens.weight))

    seen.clear()
    rng = torch.get_rng_state()
    model.eval()
    model(tokens)
    model.train()  # generate() switches to eval by itself, and back
    answer = list(generate(model, ByteTokenizer(), [1, 72, 105], max_new_tokens=5,
                           temperature=0.0))
    assert len(seen) == 1 + len(answer)  # the evaluation, the prompt, then one token a pass
    for tokens_in, output in seen:
        assert torch.equal(output, F.embedding(tokens_in, model.embed_tokens.weight))
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn outside training
    assert model.training


# ---------------------------------------------------------------- best/ and --early-stop

def fake_run(out, losses=()):
    """A run directory with config.json and metrics.jsonl rows for the held-out losses given
    ({step: loss})."""
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text('{"run_format": 1}\n')
    rows = [{"step": step, "val_loss": loss, "val_ppl": math.exp(loss)}
            for step, loss in dict(losses).items()]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def writer(weights: dict):
    """A results writer as train_sft.py gives BestKeeper: here it writes weights["now"]."""
    def write(directory):
        (directory / "model").mkdir()
        (directory / "model" / "weights").write_text(weights["now"])
    return write


def best_of(out) -> tuple[dict, str]:
    return (json.loads((out / "best" / "best.json").read_text()),
            (out / "best" / "model" / "weights").read_text())


def test_best_is_replaced_by_a_lower_loss_only_and_early_stop_counts(tmp_path):
    fake_run(tmp_path)
    weights = {}
    keeper = BestKeeper(tmp_path, writer(weights), patience=2)
    stops = []
    for step, loss in [(0, 3.0), (1, 2.0), (2, 2.5), (3, 1.5), (4, 1.5), (5, 1.7)]:
        weights["now"] = f"step {step}"
        stops.append(keeper.evaluated(step, loss))
    assert best_of(tmp_path) == ({"step": 3, "val_loss": 1.5}, "step 3")  # a tie is no better
    assert stops == [False, False, False, False, False, True]  # two without a lower one
    assert (tmp_path / "best" / "config.json").read_text() == '{"run_format": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "config.json", "metrics.jsonl"]


def test_resume_counts_from_the_logged_losses(tmp_path):
    """The lowest and the evaluations since it come from metrics.jsonl up to the resumed step."""
    fake_run(tmp_path, {0: 3.0, 2: 2.0, 4: 2.2, 6: 1.0})
    keeper = BestKeeper(tmp_path, writer({"now": "x"}), patience=2, step=4)  # resumed at step 4
    assert (keeper.lowest, keeper.since) == (2.0, 1)
    assert keeper.evaluated(6, 2.1)  # the second evaluation without a lower loss than 2.0


def test_a_crash_while_best_is_written_leaves_the_previous_whole(tmp_path, monkeypatch):
    fake_run(tmp_path)
    weights = {"now": "step 1"}
    keeper = BestKeeper(tmp_path, writer(weights))
    keeper.evaluated(1, 2.0)

    def crash(directory):  # a crash in the middle of writing the new one
        (directory / "model").mkdir()
        raise RuntimeError("disk gone")
    keeper.write = crash
    with pytest.raises(RuntimeError, match="disk gone"):
        keeper.evaluated(2, 1.0)
    assert best_of(tmp_path) == ({"step": 1, "val_loss": 2.0}, "step 1")
    assert not list(tmp_path.glob(".best*"))

    # a crash between the two renames: best/ is .best.previous.tmp; the next start renames it back
    keeper = BestKeeper(tmp_path, writer(weights), step=1)
    real_replace = best_dir.os.replace

    def no_rename_into_best(src, dst):
        if dst == tmp_path / "best":
            raise KeyboardInterrupt  # (kill -9 would leave the same)
        real_replace(src, dst)
    monkeypatch.setattr(best_dir.os, "replace", no_rename_into_best)
    weights["now"] = "step 2"
    with pytest.raises(KeyboardInterrupt):
        keeper.evaluated(2, 1.0)
    monkeypatch.undo()
    assert not (tmp_path / "best").exists()
    assert len(list(tmp_path.glob(".best.*.tmp"))) == 2  # the old one, and the new one
    BestKeeper(tmp_path, writer(weights), step=1)  # the next start (--resume)
    assert best_of(tmp_path) == ({"step": 1, "val_loss": 2.0}, "step 1")
    assert not list(tmp_path.glob(".best*"))


def test_a_run_started_over_drops_the_best_of_the_run_it_replaces(tmp_path):
    fake_run(tmp_path)
    BestKeeper(tmp_path, writer({"now": "old"})).evaluated(1, 2.0)
    fake_run(tmp_path)  # (prepare_out: a run that stopped before its first checkpoint)
    BestKeeper(tmp_path, writer({"now": "new"}), step=0)
    assert not (tmp_path / "best").exists()



class FakeRanks:
    """torchrun's Distributed as keep_best uses it: this rank of two, and whether the other one
    stops."""
    world = 2

    def __init__(self, rank: int, other_stops: bool):
        self.is_main, self.other = rank == 0, float(other_stops)

    def mean(self, value: float) -> float:
        return (value + self.other) / 2


def test_under_torchrun_rank_0_writes_best_and_every_rank_stops_together(tmp_path, capsys):
    fake_run(tmp_path)
    write, lora = writer({"now": "x"}), TrainConfig(method="lora", early_stop=1)
    first = keep_best(lora, tmp_path, object(), 0, write, FakeRanks(0, other_stops=True))
    second = keep_best(lora, tmp_path, object(), 0, write, FakeRanks(1, other_stops=False))
    assert (first.write, second.write) == (write, None)
    assert first.evaluated(0, 2.0)  # not its own count (a new lowest), the other rank's
    assert not second.evaluated(0, 2.0)
    assert (tmp_path / "best" / "best.json").is_file()
    # full fine-tuning: each rank holds a shard, no model to write
    full = replace(lora, method="full")
    assert keep_best(full, tmp_path, object(), 1, write, FakeRanks(0, False)).write is None
    assert "--method full keeps no best/" in capsys.readouterr().out
    assert keep_best(full, tmp_path, object(), 1, write).write is write  # in one process


def test_early_stop_needs_held_out_data(tmp_path):
    fake_run(tmp_path)
    with pytest.raises(UserError, match="--early-stop 3 needs held-out data"):
        keep_best(TrainConfig(early_stop=3), tmp_path, None, 0, writer({}))
    assert keep_best(TrainConfig(), tmp_path, None, 0, writer({})).write is None  # none without

# ---------------------------------------------------------------- in a training run

# The demo model on 8 records at a high learning rate: the held-out loss falls for a few steps,
# then rises while the model learns the 8 records by heart.
RISING = ["--max-steps", 6, "--eval-every", 1, "--lr", 1e-2]


@pytest.fixture
def demo_data(tmp_path):
    """8 demo records to train on, 3 others held out."""
    return (write_records(tmp_path / "train.json", DEMO_RECORDS[:8]),
            write_records(tmp_path / "val.json", DEMO_RECORDS[8:11]))


def val_losses(out) -> dict:
    return {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}


@pytest.fixture(scope="module")
def rising(tmp_path_factory):
    """(the run's out, its data, {step: the weights at that step}): RISING, every step saved and
    evaluated, the weights taken from each save."""
    tmp = tmp_path_factory.mktemp("rising")
    train = write_records(tmp / "train.json", DEMO_RECORDS[:8])
    val = write_records(tmp / "val.json", DEMO_RECORDS[8:11])
    real_save, weights = training_run.save_state, {}

    def save_state(out, model, optimizer, scaler, step, processes):
        weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        real_save(out, model, optimizer, scaler, step, processes)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(training_run, "save_state", save_state)
        run(demo_argv(train, tmp / "out", *RISING, "--val-data", val, "--save-every", 1))
    return tmp / "out", (train, val), weights


def test_best_holds_the_weights_of_the_lowest_logged_held_out_loss(rising, capsys):
    out, _, weights = rising
    losses = val_losses(out)
    lowest = min(losses, key=losses.get)
    assert 0 < lowest < max(losses)  # it fell, then rose: best/ is not the last step
    assert json.loads((out / "best" / "best.json").read_text()) == \
        {"step": lowest, "val_loss": losses[lowest]}
    best_model, _ = load_checkpoint(out / "best" / "model")
    assert_same_tensors(best_model.state_dict(), weights[lowest])
    last_model, _ = load_checkpoint(out / "model")
    assert_same_tensors(last_model.state_dict(), weights[max(losses)])

    # generate.py reads best/ as a run: its model, the run's template and tokenizer
    capsys.readouterr()
    generate_main(["--checkpoint", str(out / "best"), "--prompt", "Name a color.",
                   "--max-new-tokens", "12", "--temperature", "0", "--precision", "fp32"])
    shown = capsys.readouterr()
    assert f"using its fine-tuned model {out / 'best' / 'model'}" in shown.err
    model = Transformer(train_sft.DEMO_CONFIG)
    model.load_state_dict(weights[lowest])
    tokenizer = ByteTokenizer()
    prompt = encode_prompt("Name a color.", tokenizer, get_template("none"))
    expected = generate(model, tokenizer, prompt, max_new_tokens=12, temperature=0.0)
    assert shown.out == tokenizer.decode(list(expected)) + "\n"


def first_stop(losses: dict, patience: int) -> int:
    """The step of the patience-th evaluation in a row without a new lowest loss."""
    lowest, since = math.inf, 0
    for step, loss in losses.items():
        lowest, since = (loss, 0) if loss < lowest else (lowest, since + 1)
        if since == patience:
            return step
    raise AssertionError("no early stop in these losses")


def test_early_stop_ends_the_run_after_n_evaluations_without_a_lower_loss(rising, tmp_path,
                                                                          capsys):
    full, (train, val), _ = rising
    stopped = tmp_path / "stopped"
    run(demo_argv(train, stopped, *RISING, "--val-data", val, "--early-stop", 2))
    expected = first_stop(val_losses(full), 2)
    assert expected < 6
    assert f"early stop at step {expected}: 2 evaluations without a lower" in \
        capsys.readouterr().out
    # the same run as far as it went, then ended as a run ends: checkpoint, model, best/
    assert val_losses(stopped) == {s: v for s, v in val_losses(full).items() if s <= expected}
    assert max(train_losses(stopped)) == expected == saved_state(stopped)["step"]
    assert (stopped / "model").is_dir()
    assert (stopped / "best" / "best.json").read_text() == \
        (full / "best" / "best.json").read_text()
    # --resume: NEFTune changes what every step trains on, so it must match; it is refused
    # before the model loads
    argv = demo_argv(train, stopped, *RISING, "--val-data", val, "--resume", "--neftune-alpha", 5)
    with pytest.raises(UserError, match=r"different settings: neftune_alpha 0\.0 → 5\.0;"):
        run(argv)


def test_resume_keeps_best_and_stops_where_the_uninterrupted_run_stops(rising, tmp_path,
                                                                       monkeypatch):
    full, (train, val), _ = rising
    lowest = json.loads((full / "best" / "best.json").read_text())["step"]
    resumed = tmp_path / "resumed"
    # the last checkpoint before best/ was written, the crash after: the resumed run does the
    # evaluation of best/ again, and counts toward --early-stop the ones after it
    crash_then_resume(monkeypatch, demo_argv(train, resumed, *RISING, "--val-data", val,
                                             "--early-stop", 2, "--save-every", lowest - 1),
                      crash_step=lowest + 1)
    expected = first_stop(val_losses(full), 2)
    assert saved_state(resumed)["step"] == expected
    assert (resumed / "best" / "best.json").read_text() == \
        (full / "best" / "best.json").read_text()
    assert_same_tensors(load_checkpoint(resumed / "best" / "model")[0].state_dict(),
                        load_checkpoint(full / "best" / "model")[0].state_dict())


def test_early_stop_without_held_out_data_is_one_line(tmp_path, demo_data, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_status:
        run_cli(train_sft.main, [str(a) for a in demo_argv(demo_data[0], out, "--early-stop", 2)])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == ("error: --early-stop 2 needs held-out data, and this run "
                                       "has none: give --val-data, or a --val-split that leaves "
                                       "some\n")
    assert not out.exists()  # the failed start took back what it had made


def test_neftune_trains_with_noise_evaluates_without_and_resumes_exactly(tmp_path, demo_data,
                                                                         monkeypatch):
    train, val = demo_data
    args = ["--max-steps", 4, "--save-every", 2, "--eval-every", 4, "--val-data", val]
    plain, noisy, resumed = tmp_path / "plain", tmp_path / "noisy", tmp_path / "resumed"
    run(demo_argv(train, plain, *args, "--max-steps", 1))  # its step 0 and 1 are all we need
    run(demo_argv(train, noisy, *args, "--neftune-alpha", ALPHA))
    assert val_losses(noisy)[0] == val_losses(plain)[0]  # the same model: no noise in evaluation
    assert train_losses(noisy)[1] != train_losses(plain)[1]  # the first step: the noise
    # the noise is drawn from torch's generator, whose state checkpoint.pt keeps
    crash_then_resume(monkeypatch, demo_argv(train, resumed, *args, "--neftune-alpha", ALPHA),
                      crash_step=4)
    assert train_losses(resumed) == train_losses(noisy)
    assert_same_tensors(saved_state(resumed)["model"], saved_state(noisy)["model"])
