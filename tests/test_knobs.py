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

from config import TrainConfig
from errors import UserError
from generate import generate
from model import ModelConfig, Transformer
from neftune import add_neftune
from run import best as best_dir
from run.best import BestKeeper, keep_best
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
    """torchrun's Distributed as keep_best uses it: this rank, and whether the other one stops."""

    def __init__(self, rank: int, other_stops: bool):
        self.is_main, self.other = rank == 0, float(other_stops)

    def mean(self, value: float) -> float:
        return (value + self.other) / 2


def test_under_torchrun_rank_0_writes_best_and_every_rank_stops_together(tmp_path, capsys):
    fake_run(tmp_path)
    write, lora = writer({"now": "x"}), TrainConfig(method="lora", early_stop=1)
    first = keep_best(lora, tmp_path, object(), 0, FakeRanks(0, other_stops=True), write)
    second = keep_best(lora, tmp_path, object(), 0, FakeRanks(1, other_stops=False), write)
    assert (first.write, second.write) == (write, None)
    assert first.evaluated(0, 2.0)  # not its own count (a new lowest), the other rank's
    assert not second.evaluated(0, 2.0)
    assert (tmp_path / "best" / "best.json").is_file()
    # full fine-tuning: each rank holds a shard, no model to write
    full = replace(lora, method="full")
    assert keep_best(full, tmp_path, object(), 1, FakeRanks(0, False), write).write is None
    assert "--method full keeps no best/" in capsys.readouterr().out


def test_early_stop_needs_held_out_data(tmp_path):
    fake_run(tmp_path)
    with pytest.raises(UserError, match="--early-stop 3 needs held-out data"):
        keep_best(TrainConfig(early_stop=3), tmp_path, None, 0)
    assert keep_best(TrainConfig(), tmp_path, None, 0).write is None  # no best/ without it
