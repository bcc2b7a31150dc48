"""Sampling and decoding: sample_next's filters, generate() on the real stories260K model against
llama2.c's greedy output, and the command line (text on stdout, diagnostics and errors on
stderr)."""
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from formats.checkpoint import load_checkpoint
from conftest import help_blocks, run_script, shared_path
from errors import UserError
from generate import generate, sample_next
from generate import main as generate_main
from model import ModelConfig, Transformer
from tokenizer import ByteTokenizer, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
STORIES_GREEDY = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
                  401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385]
STORY = (", there was a little girl named Lily. She loved to play outside in the park. One day, "
         "she saw a big, red ball. She wanted to play with it, but it was too high.\nLily's mom "
         "said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do.")
# SmolLM2-135M-Instruct (Q4_1 GGUF) answering with --template chatml, greedy, float32: the text
# transformers 5.24 printed for the same file and prompt
# (AutoModelForCausalLM.from_pretrained(..., gguf_file=..., dtype=float32)
#  .generate(apply_chat_template(...), do_sample=False, max_new_tokens=64)),
# up to <|im_end|>. Ours must print exactly this.
SMOLLM2_GREEDY = {
    "What is the capital of France?": "The capital of France is Paris.",
    "Write a haiku about the sea.": (
        "The waves of the sea, a silent beauty,\nA gentle lapping of the shore,\n"
        "A reminder of the beauty that lies beneath,\nA reminder of the ocean's power."),
    "Give three tips for staying healthy.": (
        "1. Stay hydrated: Drink plenty of water, and avoid sugary drinks.\n2. Eat a balanced "
        "diet: A balanced diet provides the body with the right amount of nutrients to function "
        "optimally.\n3. Get enough sleep: Aim for 7-8 hours of sleep each night to support your "
        "body's natural healing"),
}


# ---------------------------------------------------------------- sample_next

def _draws(logits, n=300, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return [sample_next(logits, generator=g, **kw) for _ in range(n)]


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9, 0.0])
    assert sample_next(logits, 0.0, None, None) == 1
    assert sample_next(logits, 0.0, 1, 0.01) == 1  # filters are irrelevant when greedy
    assert sample_next(-logits, 0.0, None, None) == 2


def test_sampling_is_seeded_and_spreads():
    logits = torch.zeros(10)
    a = _draws(logits, temperature=1.0, top_k=None, top_p=None)
    b = _draws(logits, temperature=1.0, top_k=None, top_p=None)
    assert a == b
    assert a != _draws(logits, seed=1, temperature=1.0, top_k=None, top_p=None)
    assert set(a) == set(range(10))  # uniform logits: every token drawn in 300 tries


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([1.0, 5.0, 2.0, 4.5, 0.5, 4.0, 3.0, -1.0])
    # hot: without top-k all 8 would show
    drawn = Counter(_draws(logits, temperature=5.0, top_k=3, top_p=None))
    assert set(drawn) == {1, 3, 5}
    assert set(_draws(logits, temperature=5.0, top_k=None, top_p=None)) == set(range(8))
    assert set(_draws(logits, temperature=5.0, top_k=1, top_p=None, n=20)) == {1}
    # k > vocab: no-op
    assert set(_draws(logits, temperature=3.0, top_k=100, top_p=None)) == set(range(8))


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    # sorted: 0.5, 0.3 (cumulative 0.8 ≥ 0.7) -> tokens 1 and 3 only
    assert set(_draws(logits, temperature=1.0, top_k=None, top_p=0.7)) == {1, 3}
    assert set(_draws(logits, temperature=1.0, top_k=None, top_p=0.85)) == {1, 3, 2}
    # the first always stays
    assert set(_draws(logits, temperature=1.0, top_k=None, top_p=0.3, n=50)) == {1}
    assert set(_draws(logits, temperature=1.0, top_k=None, top_p=1.0, n=2000)) == {0, 1, 2, 3, 4}
    # both filters
    assert set(_draws(logits, temperature=1.0, top_k=2, top_p=0.95)) == {1, 3}


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = Counter(_draws(logits, n=500, temperature=0.2, top_k=None, top_p=None))
    hot = Counter(_draws(logits, n=500, temperature=2.0, top_k=None, top_p=None))
    assert cold[0] > 480 and hot[0] < 350


# ---------------------------------------------------------------- generate() on stories260K

@pytest.fixture(scope="module")
def stories():
    d = shared_path("models", "stories260K")
    model, _ = load_checkpoint(d)
    return model, Tokenizer.from_file(d / "tok512.model")


def test_generate_greedy_reproduces_llama2c(stories):
    model, tok = stories
    prompt = tok.encode("Once upon a time", bos=True)
    assert prompt == [1, 403, 407, 261, 378]
    out = list(generate(model, tok, prompt, max_new_tokens=28, temperature=0.0))
    assert out == STORIES_GREEDY[4:]
    story_start = ", there was a little girl named Lily. She loved to play outside in the park."
    assert tok.decode(out).startswith(story_start)
    # from BOS alone the same 32 tokens
    assert list(generate(model, tok, [1], max_new_tokens=32, temperature=0.0)) == STORIES_GREEDY


def test_generate_stops_and_limits(stories):
    model, tok = stories

    class StopAt(type(tok)):
        def __init__(self, stop):
            self.__dict__.update(tok.__dict__)
            self.stop_ids = {stop}

    prompt = [1, 403, 407, 261, 378]
    assert STORIES_GREEDY[10] not in STORIES_GREEDY[4:10]
    stopped = generate(model, StopAt(STORIES_GREEDY[10]), prompt, max_new_tokens=50,
                       temperature=0.0)
    assert list(stopped) == STORIES_GREEDY[4:10]  # the stop token itself is not yielded
    assert len(list(generate(model, tok, prompt, max_new_tokens=3, temperature=0.0))) == 3
    model.train()
    sampled = list(generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, top_k=10,
                            generator=torch.Generator().manual_seed(0)))
    assert model.training  # the mode is restored
    model.eval()
    assert len(sampled) <= 20 and all(0 <= i < 512 for i in sampled)


@pytest.mark.parametrize("prompt", list(SMOLLM2_GREEDY))
def test_smollm2_greedy_answers_as_transformers_does(prompt, smollm2, smollm2_model):
    from data import encode_prompt
    from templates import get_template
    ids = encode_prompt(prompt, smollm2, get_template("chatml"))
    answer_ids = generate(smollm2_model, smollm2, ids, max_new_tokens=64, temperature=0.0)
    answer = smollm2.decode(list(answer_ids))
    assert answer == SMOLLM2_GREEDY[prompt]


def test_generate_context_limits():
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64,
                                    vocab_size=16, max_seq_len=8))
    model.init_weights(generator=torch.Generator().manual_seed(0))

    class Tok:
        stop_ids = set()
        vocab_size = 16

    # context 8: the last token is predicted at position 7 from a full cache, so 3 + 6 tokens
    # come out
    out = generate(model, Tok(), [1, 2, 3], max_new_tokens=100, temperature=0.0)
    assert len(list(out)) == 6
    with pytest.raises(UserError, match="prompt has 8 tokens; the model's context is 8"):
        list(generate(model, Tok(), list(range(8)), max_new_tokens=4))


# ---------------------------------------------------------------- the command line

def _cli(*args):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_greedy_story():
    d = shared_path("models", "stories260K")
    r = _cli("--checkpoint", str(d), "--prompt", "Once upon a time", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(STORY), r.stdout
    assert "prompt" not in r.stdout and "Traceback" not in r.stderr
    assert re.fullmatch(r"template: none \(--template auto: tok512.model has no chat template\)\n"
                        r"\[5 prompt \+ \d+ generated tokens\]\n", r.stderr), r.stderr


def test_cli_smollm2_chat(smollm2_path):
    """The README's first real command: the answer on stdout, exactly transformers' greedy text."""
    proc = _cli("--checkpoint", str(smollm2_path), "--template", "chatml", "--prompt",
                "What is the capital of France?", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The capital of France is Paris.\n"
    assert proc.stderr.endswith("[37 prompt + 7 generated tokens]\n")


def test_cli_error_is_one_line():
    r = _cli("--checkpoint", "/nonexistent")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent" in lines[0]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- one line for every mistake

def _main(argv, capsys):
    return run_script(generate_main, argv, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a device (use cpu, cuda, cuda:N or "
                           "mps)"),
    (["--device", "cuda"], "argument --device: cuda: this machine has no CUDA GPU (use --device "
                           "cpu)"),
    (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1], got 1.5"),
    (["--top-k", "-3"], "argument --top-k: must be an integer >= 1, got -3"),
    (["--top-k", "two"], "argument --top-k: must be an integer >= 1, got 'two'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8' (choose from 'bf16', "
                             "'fp16', 'fp32')"),
    ([], "the following arguments are required: --checkpoint"),
])
def test_bad_flags_are_one_line(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    checkpoint = ["--checkpoint", "/nonexistent"] if flags else []
    assert _main([*checkpoint, *flags], capsys) == (2, "", f"error: {message}\n")


def test_generate_refuses_zero_new_tokens(stories):
    model, tok = stories
    with pytest.raises(UserError, match=r"^max_new_tokens must be at least 1 \(got 0\)$"):
        list(generate(model, tok, [1, 403], max_new_tokens=0))


def test_help_gives_every_flag_a_text_and_its_default(capsys):
    code, out, err = _main(["--help"], capsys)
    assert code == 0 and err == ""
    blocks = help_blocks(out)
    flags = {"--checkpoint", "--top-p", "--top-k", "--temperature", "--max-new-tokens", "--device"}
    assert flags <= blocks.keys()
    for flag, block in blocks.items():
        if flag in ("-h", "--checkpoint"):  # (--checkpoint is required: no default)
            continue
        assert "default" in block, block
    assert "stop after this many new tokens (default: 256)" in blocks["--max-new-tokens"]


# ---------------------------------------------------------------- --checkpoint RUN_DIR

def _train(*argv):
    import train_sft
    train_sft.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real training runs: full fine-tuning of the demo, LoRA on stories260K, LoRA on the
    demo model (one step each)."""
    root = tmp_path_factory.mktemp("runs")
    small = ["--max-steps", 1, "--val-split", 0, "--batch-size", 2, "--sample-tokens", 2]
    demo = ["--template", "none", "--seq-len", 64, *small]
    _train("--out", root / "full", *demo)
    stories = shared_path("models", "stories260K")
    alpaca = shared_path("data", "litgpt_fixture_alpaca.json")
    _train("--checkpoint", stories, "--data", alpaca, "--out", root / "lora", "--seq-len", 256,
           *small)
    _train("--out", root / "demo-lora", "--method", "lora", *demo)
    return root


def test_checkpoint_is_a_full_fine_tuning_run(runs, capsys):
    code, out, err = _main(["--checkpoint", runs / "full", "--prompt", "Hi", "--temperature", 0,
                            "--max-new-tokens", 5], capsys)
    assert code == 0, err
    run = runs / "full"
    assert err.splitlines()[0] == (f"note: {run} is a training run: using its fine-tuned model "
                                   f"{run / 'model'}")
    model, _ = load_checkpoint(run / "model")
    tok = ByteTokenizer()
    expected = tok.decode(list(generate(model, tok, tok.encode("Hi", bos=True), 5, temperature=0)))
    assert out == expected + "\n"


def test_checkpoint_is_a_lora_run(runs, capsys):
    run = runs / "lora"
    stories = shared_path("models", "stories260K")
    argv = ["--prompt", "Once upon a time", "--temperature", 0, "--max-new-tokens", 12]
    code, out, err = _main(["--checkpoint", run, *argv], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == (f"note: {run} is a training run: using its adapter "
                                   f"{run / 'adapter'} on its base model {stories.resolve()}")
    # prompted as the run was trained: auto found no chat template in stories260K, so alpaca
    assert err.splitlines()[1] == f"template: alpaca (the one {run} was trained with)"
    assert json.loads((run / "config.json").read_text())["template"] == "alpaca"
    assert _main(["--checkpoint", stories, "--adapter", run / "adapter", "--template", "alpaca",
                  *argv], capsys)[1] == out
    code, _, err = _main(["--checkpoint", run, "--adapter", run / "adapter", *argv], capsys)
    assert (code, err) == (2, f"error: --checkpoint {run} is a training run that brings its own "
                              "adapter; leave out --adapter\n")


def test_checkpoint_is_an_unfinished_or_demo_lora_run(runs, tmp_path, capsys):
    code, _, err = _main(["--checkpoint", runs / "demo-lora"], capsys)
    assert (code, err) == (2, f"error: {runs / 'demo-lora'} holds an adapter for the built-in "
                              "demo model, whose random weights were never saved: there is no base "
                              "model to apply it to\n")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs / "full" / "config.json", unfinished)
    shutil.copy(runs / "full" / "metrics.jsonl", unfinished)
    code, _, err = _main(["--checkpoint", unfinished], capsys)
    assert (code, err) == (2, f"error: {unfinished} is a training run without a model/ or "
                              "adapter/ (it holds config.json, metrics.jsonl): it has not "
                              "finished; continue it with train_sft.py --resume\n")
