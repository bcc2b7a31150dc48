"""chat.py: a multi-turn conversation over piped stdin, the history trimmed to the context, and
the KV cache kept across turns (generate.PrefixCache)."""
import io

import pytest

import chat
from formats.checkpoint import load_checkpoint
from conftest import shared_path
from data import encode_prompt, resolve_template
from errors import run_cli
from generate import PrefixCache, generate
from templates import TEMPLATES
from tokenizer import Tokenizer


def run_chat(argv, lines, capsys, monkeypatch):
    """chat.py with `lines` piped in: (exit status, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    try:
        run_cli(chat.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def greedy(model, tokenizer, prompt_ids, n):
    return tokenizer.decode(list(generate(model, tokenizer, prompt_ids, n, temperature=0.0)))


def test_piped_two_turn_chat_equals_generate(smollm2_path, smollm2, smollm2_model, capsys,
                                             monkeypatch):
    """SmolLM2 in its own chat format, greedy: each reply is what generate() gives for the whole
    conversation so far, written out by the template, without a kept cache."""
    questions = ["What is the capital of France?", "And of Germany?"]
    code, out, err = run_chat(["--checkpoint", smollm2_path, "--temperature", 0,
                               "--max-new-tokens", 24], questions, capsys, monkeypatch)
    assert code == 0, err
    assert err.startswith("template: the chat template of SmolLM2-135M-Instruct.Q4_1.gguf")
    template = resolve_template("auto", smollm2, say=lambda line: None)
    turns, replies = [], []
    for question in questions:
        turns.append({"instruction": question, "input": "", "output": None})
        prompt = encode_prompt({"system": None, "turns": turns}, smollm2, template)
        turns[-1]["output"] = greedy(smollm2_model, smollm2, prompt, 24)
        replies.append(turns[-1]["output"])
    assert replies[0] == "The capital of France is Paris."
    assert out == "".join(reply + "\n" for reply in replies)


@pytest.fixture(scope="module")
def stories():
    model, _ = load_checkpoint(shared_path("models", "stories260K"))
    return model.eval(), Tokenizer.from_file(shared_path("models", "stories260K", "tok512.model"))


def test_a_kept_cache_gives_the_same_tokens_and_runs_only_the_new_ones(stories):
    model, tok = stories
    template = TEMPLATES["alpaca"]
    first = {"system": None, "turns": [{"instruction": "Tell a story.", "input": "",
                                        "output": None}]}
    prompt = encode_prompt(first, tok, template)
    fed = []
    forward = model.forward
    model.forward = lambda tokens, **kw: fed.append(tokens.shape[1]) or forward(tokens, **kw)
    try:
        cache = PrefixCache(model)
        reply = list(generate(model, tok, prompt, 20, temperature=0.0, cache=cache))
        assert reply == list(generate(model, tok, prompt, 20, temperature=0.0))
        first["turns"][0]["output"] = tok.decode(reply)
        first["turns"].append({"instruction": "Another one.", "input": "", "output": None})
        second = encode_prompt(first, tok, template)
        fed.clear()
        again = list(generate(model, tok, second, 20, temperature=0.0, cache=cache))
        shared = fed[0]
        fed.clear()
        assert again == list(generate(model, tok, second, 20, temperature=0.0))
    finally:
        del model.forward
    assert fed[0] == len(second)  # without the cache, the whole prompt runs
    assert shared < len(second) - len(prompt)  # with it, only what the first prompt lacked


def test_history_is_trimmed_from_the_oldest_turn(capsys, monkeypatch):
    """stories260K has a 512-token context, 504 for the prompt with 8 kept for a reply: two turns
    of ~225 tokens fit (alpaca's ~96 + the line's 120 + a reply of 8), three do not."""
    stories = shared_path("models", "stories260K")
    long_line = "the cat sat on the mat and " * 12  # 120 tokens
    code, out, err = run_chat(["--checkpoint", stories, "--temperature", 0, "--max-new-tokens", 8,
                               "--template", "alpaca"],
                              [long_line, long_line, long_line, "/reset", "Hi"], capsys,
                              monkeypatch)
    assert code == 0, err
    assert len(out.splitlines()) == 4  # four replies
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == ["note: the conversation no longer fits in the model's context: dropped the "
                     "oldest turn (2 kept)"]
    assert "(the conversation is forgotten)" in err
    code, out, err = run_chat(["--checkpoint", stories, "--max-new-tokens", 8, "--template",
                               "alpaca"], [long_line * 4], capsys, monkeypatch)
    assert code == 2 and err.splitlines()[-1].startswith("error: the message has ")


def test_reset_and_exit(capsys, monkeypatch):
    stories = shared_path("models", "stories260K")
    code, out, err = run_chat(["--checkpoint", stories, "--temperature", 0, "--max-new-tokens", 6,
                               "--template", "alpaca"], ["Hi", "/reset", "Hi", "/exit", "Hi"],
                              capsys, monkeypatch)
    assert code == 0, err
    replies = out.splitlines()
    assert len(replies) == 2 and replies[0] == replies[1]
