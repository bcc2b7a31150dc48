"""train_sft.py: the training loop end to end, on the built-in demo model and on the real
stories260K.

What is checked: a tiny model overfits a few examples; gradient accumulation gives the gradient of
one big batch; a crashed or interrupted run resumes bit-exactly; checkpoints are written atomically;
a NaN loss stops the run before it touches the weights; bad input gets one line and exit status 2,
and never clobbers an earlier run; the learning-rate schedule and the memory estimate; --merge.

Runs call train_sft.main in-process (a few seconds in all); failures are injected by monkeypatching
train_step, Transformer.loss or torch.save.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batching
import data
import train_sft
from formats.checkpoint import load_checkpoint
from conftest import ROOT, help_blocks, shared_path
from errors import UserError, run_cli
from generate import generate
from formats.adapter import load_adapter
from model import ModelConfig, Transformer
import templates
from tokenizer import ByteTokenizer

DEMO_RECORDS = json.loads((ROOT / "examples" / "alpaca_demo.json").read_text())


# ---------------------------------------------------------------- helpers

def write_records(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def run(argv):
    train_sft.main([str(a) for a in argv])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def saved_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def files_of(directory: Path) -> dict:
    """{relative path: bytes} of everything under `directory` (to prove nothing was touched)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max():.3g}"


def fail_train_step_at(monkeypatch, call: int, exc: BaseException):
    """Make the call-th train_step raise `exc` before doing anything (so no RNG is consumed)."""
    real, calls = train_sft.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(train_sft, "train_step", flaky)


@pytest.fixture
def demo_data(tmp_path):
    """8 short demo records (22-57 bytes with --template none) and 3 others for validation."""
    return (write_records(tmp_path / "train.json", DEMO_RECORDS[:8]),
            write_records(tmp_path / "val.json", DEMO_RECORDS[8:11]))


def demo_argv(train, out, *extra):
    """The demo model (full fine-tuning, byte tokenizer) at a small size: 4 micro-batches of 2 per
    epoch."""
    return ["--checkpoint", "tiny", "--data", train, "--out", out, "--template", "none",
            "--seq-len", 64, "--batch-size", 2, "--grad-accum", 2, "--val-split", 0,
            "--warmup-steps", 2, "--save-every", 100, "--sample-tokens", 2, *extra]


def stories_argv(out, *extra):
    """LoRA on the real stories260K checkpoint and real Alpaca data (10 of 23 records fit in 128
    tokens)."""
    return ["--checkpoint", shared_path("models", "stories260K"),
            "--data", shared_path("data", "litgpt_fixture_alpaca.json"),
            "--out", out, "--seq-len", 128, "--batch-size", 2, "--grad-accum", 2, "--val-split", 0,
            "--lr", 1e-2, "--warmup-steps", 2, "--sample-tokens", 2, *extra]


# ---------------------------------------------------------------- 1. the demo model overfits

def test_overfits_a_handful_of_examples(tmp_path, demo_data):
    out = tmp_path / "out"
    # batch 8 (demo default): the 8 records are one batch
    run(["--checkpoint", "tiny", "--data", demo_data[0], "--out", out, "--template", "none",
         "--seq-len", 64, "--val-split", 0, "--max-steps", 60, "--save-every", 1000])
    losses = train_losses(out)
    assert list(losses) == list(range(1, 61))
    # a random init predicts ~uniformly over the 258 byte tokens; observed: 5.54 → 0.07
    # after 60 steps
    assert abs(losses[1] - math.log(ByteTokenizer.vocab_size)) < 0.1
    assert losses[60] < 0.25
    assert losses[60] < losses[1] / 20
    # memorised: greedy decoding of a training prompt with the saved model gives its answer back
    model, _ = load_checkpoint(out / "model")
    tok, template = ByteTokenizer(), templates.get_template("none")
    record = DEMO_RECORDS[0]
    answer = tok.decode(list(generate(model.eval(), tok,
                                      data.encode_prompt(record["instruction"], tok, template),
                                      max_new_tokens=40, temperature=0)))
    assert answer == record["output"]


def test_pure_bf16_full_finetuning(tmp_path, demo_data, monkeypatch):
    """--pure-bf16: the trained weights (and so their gradients and AdamW moments) are bf16, and
    the demo still learns; LoRA or fp32 with it is refused."""
    out, seen = tmp_path / "out", {}
    real_step = train_sft.train_step

    def spy(model, optimizer, *args, **kwargs):
        result = real_step(model, optimizer, *args, **kwargs)
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["moments"] = {v.dtype for state in optimizer.state.values() for v in state.values()
                           if v.dim()}
        return result
    monkeypatch.setattr(train_sft, "train_step", spy)
    run(demo_argv(demo_data[0], out, "--max-steps", 12, "--lr", 3e-3, "--pure-bf16",
                  "--precision", "bf16"))
    assert seen["dtypes"] == seen["moments"] == {torch.bfloat16}
    losses = train_losses(out)
    assert losses[12] < losses[1] - 1
    for extra in (["--precision", "fp32"], ["--method", "lora", "--precision", "bf16"]):
        fails_with(demo_argv(demo_data[0], tmp_path / "x", "--pure-bf16", *extra),
                   "--pure-bf16 is for --method full")
    for extra in (["--method", "lora"], ["--pure-bf16", "--precision", "bf16"]):
        fails_with(demo_argv(demo_data[0], tmp_path / "x", "--adamw-state", "bf16", *extra),
                   "--adamw-state bf16 is for --method full with float32 weights")



def test_bf16_adamw_state_is_refused_under_torchrun(tmp_path, demo_data, monkeypatch):
    """optim.py does not handle FSDP's sharded weights: under torchrun, one line before anything
    is written."""
    class TwoRanks:
        device, world = "cpu", 2
    monkeypatch.setattr(train_sft, "start_processes", lambda device: TwoRanks())
    out = tmp_path / "out"
    fails_with(demo_argv(demo_data[0], out, "--adamw-state", "bf16"),
               "--adamw-state bf16 runs in one process, not under torchrun")
    assert not out.exists()

# ---------------------------------------------------------------- 2. gradient accumulation

ACCUM_CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                           vocab_size=ByteTokenizer.vocab_size, max_seq_len=256)


def accum_batches():
    """8 examples of very different lengths: as 1 micro-batch of 8 and as 4 micro-batches of 2."""
    tok, template = ByteTokenizer(), templates.get_template("none")
    records = [{"instruction": f"Q{i}:", "input": "", "output": "ab" * n} for i, n in
               enumerate([2, 60, 5, 3, 40, 90, 7, 25])]
    examples = [data.encode_example(r, tok, template, 256) for r in records]
    one = [batching.collate([[e] for e in examples], tok.eos_id, packed=False)]
    four = [batching.collate([[e] for e in examples[i:i + 2]], tok.eos_id, packed=False)
            for i in range(0, 8, 2)]
    return one, four


def fresh_model():
    model = Transformer(ACCUM_CONFIG)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.train()


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def train_step_grads(micro_batches, loss_chunk):
    """(loss, {name: gradient}) of one train_step; the optimizer's step only records the
    gradients."""
    model = fresh_model()
    optimizer = train_sft.make_optimizer(model, 0.0, 0.0, "cpu")
    grads = {}
    optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    config = train_sft.TrainConfig(device="cpu", precision="fp32", grad_clip=0,
                                   loss_chunk=loss_chunk)
    n_targets = sum(train_sft.count_targets(b) for b in micro_batches)
    loss, _ = train_sft.train_step(model, optimizer, micro_batches, n_targets, config)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    return loss, grads


@pytest.mark.parametrize("loss_chunk", [0, 16])
def test_grad_accumulation_equals_one_big_batch(loss_chunk):
    one, four = accum_batches()
    counts = [train_sft.count_targets(b) for b in four]
    # uneven micro-batches
    assert len(set(counts)) == 4 and sum(counts) == train_sft.count_targets(one[0])
    loss_1, g_1 = train_step_grads(one, loss_chunk)
    loss_4, g_4 = train_step_grads(four, loss_chunk)
    assert g_1.keys() == g_4.keys() and len(g_1) == len(list(fresh_model().parameters()))
    assert abs(loss_1 - loss_4) <= 1e-6 * loss_1
    for name in g_1:
        assert (g_1[name] - g_4[name]).norm() <= 1e-6 * g_1[name].norm(), name
    assert (flat(g_1) - flat(g_4)).norm() <= 1e-6 * flat(g_1).norm()

    # The tempting alternative, a mean per micro-batch (then averaged), is NOT the same gradient.
    model = fresh_model()
    for b in four:
        (train_sft.batch_loss(model, b, "cpu", "fp32", loss_chunk) / train_sft.count_targets(b)
         / len(four)).backward()
    per_micro = flat({n: p.grad for n, p in model.named_parameters()})
    assert (per_micro - flat(g_1)).norm() > 1e-2 * flat(g_1).norm()


def test_evaluate_is_the_mean_over_target_tokens_and_keeps_train_mode():
    one, four = accum_batches()
    model = fresh_model()
    with torch.no_grad():
        expected = float(model.loss(one[0]["tokens"], one[0]["labels"])) / \
            train_sft.count_targets(one[0])
    assert train_sft.evaluate(model, four, "cpu", "fp32") == pytest.approx(expected, rel=1e-6)
    assert model.training


# ---------------------------------------------------------------- 3. exact resume

def crash_then_resume(monkeypatch, argv, crash_step):
    """Run `argv` until train_step crashes at crash_step, then run the same command plus
    --resume."""
    with monkeypatch.context() as m:
        fail_train_step_at(m, crash_step, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(argv)
    run(argv + ["--resume"])


def test_lora_resume_is_exact_on_stories260k(tmp_path, monkeypatch):
    val = write_records(tmp_path / "val.json",
                        [{"instruction": "Say hi.", "output": "Hi there."},
                         {"instruction": "Name a color.", "output": "Blue."}])
    # dropout > 0: the resumed run must restore the RNG to draw the same masks; an evaluation
    # (with a generated sample) at step 3 must not disturb anything either.
    args = ["--lora-dropout", 0.1, "--max-steps", 6, "--save-every", 3, "--eval-every", 3,
            "--val-data", val]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(stories_argv(straight, *args))
    crash_then_resume(monkeypatch, stories_argv(resumed, *args), crash_step=4)

    a, b = saved_state(straight), saved_state(resumed)
    assert a["step"] == b["step"] == 6
    assert a["model"] and all(".lora_" in k for k in a["model"])  # only the adapters are trainable
    assert_same_tensors(a["model"], b["model"])
    # B moved from its 0 init
    assert all(v.abs().max() > 0 for k, v in a["model"].items() if k.endswith("lora_B"))
    assert (straight / "adapter" / "adapter.safetensors").read_bytes() == \
        (resumed / "adapter" / "adapter.safetensors").read_bytes()
    # steps 4-6 of the resumed run: the same losses
    assert train_losses(straight) == train_losses(resumed)
    # 0: before training
    assert [r["step"] for r in metrics(resumed) if "val_loss" in r] == [0, 3, 6]


@pytest.mark.parametrize("adamw_state", ["fp32", "bf16"])
def test_full_finetuning_resume_is_exact_on_the_demo(tmp_path, monkeypatch, demo_data,
                                                     adamw_state):
    """Also with AdamW's moments in bf16 (--adamw-state bf16, optim.py): stochastic rounding from
    a hash of the step, so the resumed run rounds as the uninterrupted one did."""
    train, val = demo_data
    # crosses epochs (4 micro-batches each)
    args = ["--max-steps", 6, "--save-every", 3, "--eval-every", 3, "--val-data", val,
            "--adamw-state", adamw_state]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(demo_argv(train, straight, *args))
    # last checkpoint: step 3
    crash_then_resume(monkeypatch, demo_argv(train, resumed, *args), crash_step=5)

    a, b = saved_state(straight), saved_state(resumed)
    assert a["step"] == b["step"] == 6
    moments = {v.dtype for state in b["optimizer"]["state"].values() for k, v in state.items()
               if k.startswith("exp_avg")}
    assert moments == {torch.bfloat16 if adamw_state == "bf16" else torch.float32}
    # every weight
    assert len(a["model"]) == len(list(Transformer(train_sft.DEMO_CONFIG).parameters()))
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(load_checkpoint(straight / "model")[0].state_dict(),
                        load_checkpoint(resumed / "model")[0].state_dict())
    assert train_losses(straight) == train_losses(resumed)
    assert train_losses(straight)[6] < train_losses(straight)[1] - 1  # it did train
    # step 4 ran twice (before the crash, and after resuming from step 3) but is logged once
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(resumed)] == \
           [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(straight)]
    # validation at 0, 3 and 6
    assert [r["step"] for r in metrics(resumed)] == [0, 1, 2, 3, 3, 4, 5, 6, 6]


# ---------------------------------------------------------------- 4. atomic checkpoints

def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, demo_data):
    out = tmp_path / "out"
    argv = demo_argv(demo_data[0], out, "--max-steps", 6, "--save-every", 2)
    real_save, targets, before = torch.save, [], {}

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        targets.append(Path(f))
        if len(targets) == 2:  # the save at step 4: half a file, then the disk is full
            before["checkpoint"] = (out / "checkpoint.pt").read_bytes()
            Path(f).write_bytes(b"PK\x03\x04 half a zip file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full_on_second_save)
        with pytest.raises(UserError, match="no space left on device while writing"):
            run(argv)
    assert len(targets) == 2
    # written beside, under another name
    assert targets[1].parent == out and targets[1].name != "checkpoint.pt"
    assert (out / "checkpoint.pt").read_bytes() == before["checkpoint"]
    assert saved_state(out)["step"] == 2
    # no temp file
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "config.json",
                                                     "metrics.jsonl", "report.html", "report.md",
                                                     "samples.jsonl", "token_losses.jsonl"]
    run(argv + ["--resume"])  # and the run goes on from step 2
    assert saved_state(out)["step"] == 6


# ---------------------------------------------------------------- 5. NaN loss

@pytest.mark.parametrize("save_every", [2, 100])
def test_nan_loss_stops_before_touching_the_weights(tmp_path, monkeypatch, capsys, demo_data,
                                                    save_every):
    out = tmp_path / "out"
    real_loss, real_step = Transformer.loss, train_sft.train_step
    calls, after_step, models = [], [], []

    def loss_nan_at_step_3(self, *args, **kwargs):
        value = real_loss(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            # step 3's second micro-batch (--grad-accum 2): its first one already backpropagated
            if len(calls) == 6:
                return value * float("nan")
        return value

    def spy(model, *args, **kwargs):
        result = real_step(model, *args, **kwargs)
        models.append(model)
        if math.isfinite(result[0]):
            after_step.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return result

    monkeypatch.setattr(Transformer, "loss", loss_nan_at_step_3)
    monkeypatch.setattr(train_sft, "train_step", spy)
    argv = demo_argv(demo_data[0], out, "--max-steps", 6, "--save-every", save_every)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sft.main, [str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: loss is nan at step 3; stopped before updating the weights "
                          "(try a lower --lr). ")
    assert len(after_step) == 2 and len(models) == 3
    model = models[-1]
    # steps do move the weights
    assert not torch.equal(after_step[0]["norm.weight"], after_step[1]["norm.weight"])
    for name, p in model.named_parameters():
        assert torch.equal(p, after_step[1][name]), name  # ... but the NaN step did not
        assert p.grad is None  # nor left its gradients for the next step
    assert train_losses(out).keys() == {1, 2}
    if save_every == 2:
        assert f"The last good checkpoint is in {out}" in err
        state = saved_state(out)
        assert state["step"] == 2
        assert_same_tensors(state["model"], after_step[1])
    else:
        assert "No checkpoint was saved before it (--save-every 100)" in err
        assert not (out / "checkpoint.pt").exists()


def test_a_non_finite_gradient_stops_the_run_too(tmp_path, demo_data):
    """lr 1e4 wrecks the weights in one step: the next loss is still finite, but its gradient is
    not. The run stops there with one line, instead of going on without updating anything."""
    out = tmp_path / "out"
    text = fails_with(demo_argv(demo_data[0], out, "--max-steps", 10, "--lr", 1e4,
                                "--warmup-steps", 0, "--grad-clip", 0),
                      "the gradient norm is nan at step 2; stopped before "
                      "updating the weights (try a lower --lr)")
    assert "No checkpoint was saved before it" in text
    assert train_losses(out).keys() == {1}


# ---------------------------------------------------------------- 6. Ctrl-C

def test_ctrl_c_saves_and_resume_continues(tmp_path, monkeypatch, capsys, demo_data):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = ["--max-steps", 6]  # --save-every 100: the only checkpoint is the one Ctrl-C writes
    run(demo_argv(demo_data[0], straight, *args))
    with monkeypatch.context() as m:
        fail_train_step_at(m, 4, KeyboardInterrupt())
        with pytest.raises(SystemExit) as exit_info:
            run(demo_argv(demo_data[0], interrupted, *args))
    assert exit_info.value.code == 130
    assert f"interrupted: saved step 3 to {interrupted / 'checkpoint.pt'}" in \
        capsys.readouterr().err
    assert saved_state(interrupted)["step"] == 3
    assert not (interrupted / "model").exists()  # the run did not finish

    run(demo_argv(demo_data[0], interrupted, *args, "--resume"))
    # continued at 4, nothing repeated
    assert [r["step"] for r in metrics(interrupted)] == [1, 2, 3, 4, 5, 6]
    assert train_losses(interrupted) == train_losses(straight)
    assert_same_tensors(saved_state(interrupted)["model"], saved_state(straight)["model"])


def test_ctrl_c_before_the_first_step(tmp_path, monkeypatch, demo_data):
    out = tmp_path / "out"
    argv = demo_argv(demo_data[0], out, "--max-steps", 2)
    with monkeypatch.context() as m:
        fail_train_step_at(m, 1, KeyboardInterrupt())
        with pytest.raises(SystemExit, match="130"):
            run(argv)
    assert saved_state(out)["step"] == 0 and not (out / "metrics.jsonl").exists()
    run(argv + ["--resume"])
    assert list(train_losses(out)) == [1, 2]


# ---------------------------------------------------------------- 7. bad input

@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier") / "run"
    run(stories_argv(out, "--max-steps", 1))
    return out


def fails_with(argv, message: str):
    with pytest.raises(UserError) as info:
        run(argv)
    text = str(info.value)
    assert "\n" not in text
    assert message in text, text
    return text


def test_missing_checkpoint(tmp_path, earlier_run):
    before = files_of(earlier_run)
    out, missing = tmp_path / "out", tmp_path / "no-such-model"
    fails_with(stories_argv(out, "--checkpoint", missing), f"checkpoint not found: {missing}")
    # the fixed command may use --out
    train_sft.prepare_out(train_sft.parse_args([str(a) for a in stories_argv(out)]))
    assert files_of(earlier_run) == before


def test_missing_data(tmp_path):
    out, missing = tmp_path / "out", tmp_path / "no-such.json"
    fails_with(stories_argv(out, "--data", missing), f"data file not found: {missing}")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()
    train_sft.prepare_out(train_sft.parse_args([str(a) for a in stories_argv(out)]))


def test_missing_data_on_the_command_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train_sft.py", "--data", "no-such.json",
                           "--out", str(out), "--max-steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "error: data file not found: no-such.json\n"


@pytest.mark.parametrize("under", ["", "sub"])
def test_unwritable_out(tmp_path, under):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    out = a_file / under if under else a_file
    fails_with(stories_argv(out), f"cannot write to --out {out}: ")
    assert a_file.read_text() == "not a directory"


def test_out_holding_another_run(earlier_run):
    before = files_of(earlier_run)
    assert {"config.json", "checkpoint.pt", "metrics.jsonl", "adapter/adapter.safetensors"} <= \
        before.keys()
    fails_with(stories_argv(earlier_run, "--lora-r", 8),
               f"{earlier_run} already holds a run; pass --resume to continue it or choose "
               "another --out")
    # even the same settings: never silently restarted
    fails_with(stories_argv(earlier_run), "already holds a run")
    assert files_of(earlier_run) == before


def test_unknown_lora_target(tmp_path):
    out = tmp_path / "out"
    fails_with(stories_argv(out, "--lora-targets", "q,foo"),
               "unknown LoRA target 'foo'; valid: q, k, v, o, gate, up, down, head, all")
    train_sft.prepare_out(train_sft.parse_args([str(a) for a in stories_argv(out)]))


def test_resume_with_other_settings(earlier_run):
    before = files_of(earlier_run)
    fails_with(stories_argv(earlier_run, "--lora-r", 8, "--resume"),
               f"--resume: {earlier_run} was trained with different settings: lora_r 16 → 8")
    fails_with(stories_argv(earlier_run, "--seed", 1, "--batch-size", 4, "--resume"),
               "batch_size 2 → 4, seed 42 → 1")
    assert files_of(earlier_run) == before


def test_resume_without_a_run(tmp_path):
    fails_with(stories_argv(tmp_path / "empty", "--resume"),
               f"--resume: {tmp_path / 'empty'} holds no run (no config.json)")


@pytest.mark.parametrize("option", ["--save-every", "--batch-size", "--grad-accum", "--seq-len",
                                    "--eval-every"])
def test_zero_sizes_are_refused(tmp_path, option):
    with pytest.raises(UserError, match=f"^argument {option}: must be an integer >= 1, got 0$"):
        train_sft.parse_args(["--out", str(tmp_path / "out"), option, "0"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 8. schedule

def test_lr_warmup_then_cosine():
    lr = [train_sft.lr_at(s, 1.0, warmup=4, total=14) for s in range(16)]
    # linear warmup, reaching the peak at its last step
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0)  # cosine from the peak ...
    assert lr[9] == pytest.approx(0.5)  # halfway through the decay
    assert lr[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    # ... to 0, and stays
    assert lr[14] == pytest.approx(0.0, abs=1e-12) and lr[15] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
    # no warmup: the peak at once
    assert train_sft.lr_at(0, 3e-4, warmup=0, total=10) == pytest.approx(3e-4)


# ---------------------------------------------------------------- 9. end to end with --merge

def test_lora_merge_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "out"
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    at_end = {}
    real_finish = train_sft.finish

    # the logits of the trained LoRA model, before it is merged
    def finish(args, out, model, tokenizer):
        model.eval()
        with torch.no_grad():
            at_end["logits"] = model(tokens)
        real_finish(args, out, model, tokenizer)
    monkeypatch.setattr(train_sft, "finish", finish)
    run(stories_argv(out, "--max-steps", 3, "--warmup-steps", 1, "--merge"))

    assert (out / "adapter" / "adapter_config.json").is_file() and \
        (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file() and \
        (out / "hf" / "config.json").is_file()
    # the tokenizer travels with the model, so generate.py --checkpoint out/model needs nothing else
    tok = shared_path("models", "stories260K", "tok512.model").read_bytes()
    assert (out / "model" / "tokenizer.model").read_bytes() == tok == \
        (out / "hf" / "tokenizer.model").read_bytes()
    # not private to the owner (mkstemp's 0600)
    assert (out / "model" / "model.safetensors").stat().st_mode & 0o044
    base, _ = load_checkpoint(shared_path("models", "stories260K"))
    with torch.no_grad():
        base_logits = base.eval()(tokens)
        adapted = load_adapter(base, out / "adapter").eval()(tokens)
        merged = load_checkpoint(out / "model")[0].eval()(tokens)
        hf = load_checkpoint(out / "hf")[0].eval()(tokens)
    # 3 steps at lr 1e-2 did change the model
    assert (at_end["logits"] - base_logits).abs().max() > 1e-2
    assert torch.allclose(adapted, at_end["logits"], atol=1e-5)
    assert torch.allclose(merged, at_end["logits"], atol=1e-4)
    assert torch.allclose(hf, merged, atol=1e-5)


# ---------------------------------------------------------------- 10. the real SmolLM2, end to end

def test_smollm2_lora_sft_and_hf_export(tmp_path, smollm2_path, smollm2):
    """LoRA SFT of the real SmolLM2-135M-Instruct (Q4_1 GGUF, byte-level BPE, ChatML) for a few
    steps, then --merge: out/hf loads in transformers, weights and tokenizer (with the chat
    template), and gives our merged model's logits."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    run(["--checkpoint", smollm2_path, "--data", shared_path("data", "litgpt_fixture_alpaca.json"),
         "--template", "chatml", "--out", out, "--seq-len", 96, "--batch-size", 2,
         "--grad-accum", 1, "--val-split", 0.1, "--max-steps", 3, "--warmup-steps", 1,
         "--lr", 1e-3, "--merge"])
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3]  # before training, and after
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # held-out answers became more likely
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        out / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    messages = [{"role": "user", "content": "Give three tips for staying healthy."}]
    ids = data.encode_prompt(messages[0]["content"], smollm2, templates.get_template("chatml"))
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False) == ids
    merged, _ = load_checkpoint(out / "model")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        assert (hf_model(tokens).logits - merged.eval()(tokens)).abs().max() <= 1e-4


def test_settings_the_run_had_to_change_are_said_and_recorded(tmp_path, capsys):
    """--seq-len beyond stories260K's 512-token context, and a warmup longer than the run: a note
    each, config.json keeps the given values (what --resume compares) and the effective ones."""
    out = tmp_path / "out"
    run(stories_argv(out, "--seq-len", 100000, "--max-steps", 3, "--warmup-steps", 100))
    printed = capsys.readouterr().out
    assert "note: --seq-len 100000 is longer than the model's context; using 512" in printed
    assert ("note: --warmup-steps 100 is not shorter than the run (3 steps); warming up for "
            "1 steps") in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["seq_len"], config["warmup_steps"]) == (100000, 100)
    assert config["effective"] == {"seq_len": 512, "warmup_steps": 1}
    run(stories_argv(out, "--seq-len", 100000, "--max-steps", 4, "--warmup-steps", 100, "--resume"))
    assert saved_state(out)["step"] == 4


def test_the_demo_runs_from_any_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--max-steps", "1",
                           "--val-split", "0", "--out", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_help_gives_every_flag_a_text_and_its_default(capsys):
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--help"])
    blocks = help_blocks(capsys.readouterr().out)
    assert {"--checkpoint", "--seed", "--device", "--lr", "--pure-bf16", "--lora-r"} <= \
        blocks.keys()
    for flag, block in blocks.items():
        if flag != "-h":
            assert "default" in block, block
