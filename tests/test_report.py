"""The run report (run/report.py, run/svg.py), the sample prompts (run/samples.py) and report.py.

1. The page from a run directory written here: it parses as HTML, loads nothing from the network,
   its SVG draws the logged points, its tables hold every answer; report.md the same tables.
2. Whether an answer ended with the end token, as generate() stopped.
3. A real run (LoRA on stories260K): the answers in samples.jsonl are what generate.py answers
   for the base checkpoint and for the run; a resumed run continues the same history.
4. report.py: one run's report drawn again, runs compared, a directory that is no run refused.
"""
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import generate
import report
import train_sft
from conftest import run_script, shared_path
from model import ModelConfig, Transformer
from run import samples
from run.report import write_report
from run.run_dir import RUN_FORMAT
from tokenizer import ByteTokenizer

# HTML elements that have no end tag
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr"}
SVG_LEAVES = {"line", "rect", "polyline", "path"}  # written <x .../>: html.parser sees a start tag


class Page(HTMLParser):
    """The page's elements, checked to nest: every element closed in the order it was opened."""

    def __init__(self, text: str):
        super().__init__()
        self.open, self.elements, self.text = [], [], []
        self.feed(text)
        self.close()
        assert not self.open, f"elements never closed: {self.open}"

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.elements if name == tag]


def write_rows(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


TRAIN = [(step, 3.0 * 0.8 ** step) for step in range(1, 11)]
HELD_OUT = [(0, 3.2), (5, 1.4), (10, 0.9)]
ANSWERS = {0: ["<b>not bold</b> & on", "rambles"], 5: ["Blue.", "Hi | there"],
           10: ["Blue.", "Hi there.\nBye."]}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as train_sft.py leaves it, written here: config.json and the three logs
    (the last line of metrics.jsonl torn, as a kill leaves it; a row of the others edited by
    hand, which the report leaves out)."""
    out = tmp_path / "run"
    out.mkdir()
    config = {"run_format": RUN_FORMAT, "checkpoint": "models/stories260K", "data": "d.json",
              "val_split": 0.1, "template": "alpaca", "method": "lora", "seed": 42,
              "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": "q,v"}, "lr": 3e-4,
              "warmup_steps": 2, "weight_decay": 0.0, "max_steps": 10, "batch_size": 2,
              "grad_accum": 4, "seq_len": 128}
    (out / "config.json").write_text(json.dumps(config))
    rows = [{"step": s, "loss": loss, "lr": 1e-3, "tokens_per_s": 100 * s, "peak_mem_gib": None}
            for s, loss in TRAIN]
    rows += [{"step": s, "val_loss": loss} for s, loss in HELD_OUT]
    write_rows(out / "metrics.jsonl", sorted(rows, key=lambda r: r["step"]))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')
    write_rows(out / "samples.jsonl", [
        {"step": step, "prompt": prompt, "answer": answer, "tokens": len(answer),
         "ended_with_end_token": step > 0 and answer.endswith(".")}
        for step, answers in ANSWERS.items()
        for prompt, answer in zip(["Name a color.", "Say hi."], answers)])
    record = {"tokens": ["<bos>", "Say", " hi", ":", " Hi", "!", "<eos>"]}
    write_rows(out / "token_losses.jsonl", [
        {"step": 0, **record, "losses": [None, None, None, None, 4.0, 3.0, 6.0]},
        {"step": 5, **record, "losses": [None, None, None, None, 1.0, 1.0, 1.0]},
        {"step": 10, **record, "losses": [None, None, None, None, 0.5, 0.25, 0.125]},
        {"step": 11, **record, "losses": [1.0]}])
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"step": 11, "prompt": "Say hi.", "answer": null, "tokens": 3}\n')
    return out


# ---------------------------------------------------------------- 1. the page

def polyline(page: Page, series: str) -> list[tuple[float, float]]:
    [line] = [a for a in page.all("polyline") if a["data-series"] == series]
    return [tuple(map(float, point.split(","))) for point in line["points"].split()]


def assert_drawn(pixels, points, log_y=True):
    """Pixels are the points under one affine map of (step, log10 loss): the SVG draws the logged
    points and only those, x to the right and loss upwards."""
    assert len(pixels) == len(points)
    (x0, y0), (x1, y1) = points[0], points[-1]
    (px0, py0), (px1, py1) = pixels[0], pixels[-1]
    value = math.log10 if log_y else float
    for (x, y), (px, py) in zip(points, pixels):
        assert px == pytest.approx(px0 + (x - x0) / (x1 - x0) * (px1 - px0), abs=0.02)
        along = (value(y) - value(y0)) / (value(y1) - value(y0))
        assert py == pytest.approx(py0 + along * (py1 - py0), abs=0.02)
    assert px1 > px0 and (py1 > py0) == (y1 < y0)  # (the page's y grows downwards)


def test_the_report_page(run_dir):
    write_report(run_dir)
    text = (run_dir / "report.html").read_text()
    page = Page(text)
    # self-contained: no script, no stylesheet, image or font fetched from anywhere
    assert not page.all("script") and not page.all("link") and not page.all("img")
    assert not [a for _, a in page.elements if "src" in a or "href" in a]
    assert re.findall(r"https?://[^\"]+", text) == ["http://www.w3.org/2000/svg"]  # a name only
    assert_drawn(polyline(page, "train"), TRAIN)
    assert_drawn(polyline(page, "held out"), HELD_OUT)
    titles = [t for t in page.text if t.startswith("held out, step")]
    assert titles == [f"held out, step {s}: {loss:.4f}" for s, loss in HELD_OUT]
    shown = "".join(page.text)
    for answers in ANSWERS.values():
        for answer in answers:  # as text: "<b>" is not markup
            assert answer in shown
    assert "base (step 0)" in shown and "0 of 2" in shown and "2 of 2" in shown
    assert "2.4000 → 0.3221" in shown  # the training loss, first and last (not the torn line)
    assert "LoRA, r 8, alpha 16, dropout 0.05, on q,v" in shown
    assert "550 (median step)" in shown and "not measured (CPU)" in shown
    # the record token by token: prompt tokens grey; trained ones coloured, before and after
    spans = [(a.get("class"), a.get("title")) for a in page.all("span")]
    record = [s for s in spans if s[0] == "prompt" or (s[1] or "").startswith("loss")]
    assert record == [("prompt", None)] * 4 + [(None, "loss 4.000"), (None, "loss 3.000"),
                                               (None, "loss 6.000")] + \
        [("prompt", None)] * 4 + [(None, "loss 0.500"), (None, "loss 0.250"), (None, "loss 0.125")]


def test_the_markdown_report_has_the_same_tables(run_dir):
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "| base (step 0) | 0 of 2 |\n| step 5 | 1 of 2 |\n| step 10 | 2 of 2 |" in md
    assert "| step 5 | Hi \\| there | 10 | no |" in md
    assert "| step 10 | Hi there.↵ Bye. | 14 | yes |" in md
    assert "| `!` | 3.000 | 0.250 |" in md
    assert "| training loss | 2.4000 → 0.3221 |" in md


def test_a_run_without_answers_yet(run_dir):
    for name in ("samples.jsonl", "token_losses.jsonl", "metrics.jsonl"):
        (run_dir / name).unlink()
    write_report(run_dir)
    assert "(nothing logged yet)" in "".join(Page((run_dir / "report.html").read_text()).text)


# ---------------------------------------------------------------- 2. whether an answer stopped

def test_an_answer_ended_with_the_end_token_only_when_generate_stopped_at_one():
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                         vocab_size=ByteTokenizer.vocab_size, max_seq_len=128)
    model = Transformer(config)
    model.init_weights()
    tok = ByteTokenizer()
    prompt = tok.encode("Hi", bos=True)
    tokens, ended = samples.answer(model, tok, prompt, 48)  # random weights: no end token in 48
    assert len(tokens) == 48 and not ended

    class StopsEarly(ByteTokenizer):  # the 4th token answered is now an end token
        stop_ids = {tokens[3]}
    first = tokens.index(tokens[3])
    assert samples.answer(model, StopsEarly(), prompt, 48) == (tokens[:first], True)
    model.config.max_seq_len = len(prompt) + 10  # the context fills before 48 tokens
    short, ended = samples.answer(model, tok, prompt, 48)
    assert (short, ended) == (tokens[:11], False)


# ---------------------------------------------------------------- 3. a real run

PROMPTS = ["Name a color.", "Write a haiku about the sea."]
TOKENS = 40  # --sample-tokens

@pytest.fixture(scope="module")
def stories_run(tmp_path_factory) -> Path:
    """LoRA on the real stories260K checkpoint, 4 steps, evaluated every 2, two sample prompts."""
    out = tmp_path_factory.mktemp("stories") / "run"
    argv = ["--checkpoint", shared_path("models", "stories260K"),
            "--data", shared_path("data", "litgpt_fixture_alpaca.json"), "--out", out,
            "--seq-len", 128, "--batch-size", 2, "--grad-accum", 1, "--val-split", 0.2,
            "--lr", 1e-2, "--warmup-steps", 1, "--max-steps", 4, "--eval-every", 2,
            "--sample-prompt", PROMPTS[0], "--sample-prompt", PROMPTS[1],
            "--sample-tokens", TOKENS]
    train_sft.main([str(a) for a in argv])
    return out


def generated(checkpoint, prompt: str, capsys, *extra) -> dict:
    """generate.py's greedy answer, as samples.jsonl writes one."""
    code, out, err = cli(["--checkpoint", checkpoint, "--prompt", prompt, "--temperature", 0,
                          "--max-new-tokens", TOKENS, *extra], capsys,
                         main=generate.main)
    assert code == 0, err
    tokens = int(re.search(r"\+ (\d+) generated tokens", err).group(1))
    return {"prompt": prompt, "answer": out[:-1], "tokens": tokens}


def test_the_answers_are_what_generate_py_answers(stories_run, capsys):
    rows = [json.loads(line) for line in (stories_run / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 2, 4) for p in PROMPTS]
    stories = shared_path("models", "stories260K")
    for row in rows:
        answered = {k: row[k] for k in ("prompt", "answer", "tokens")}
        if row["step"] == 0:  # the base model, prompted with the template the run used
            assert answered == generated(stories, row["prompt"], capsys, "--template", "alpaca")
        if row["step"] == 4:  # the tuned model: the run's adapter on its base
            assert answered == generated(stories_run, row["prompt"], capsys)
        stopped = row["tokens"] < TOKENS  # (the context, 512, is never full here)
        assert row["ended_with_end_token"] == stopped
    assert rows[0]["answer"] != rows[-2]["answer"]  # it did learn something
    page = Page((stories_run / "report.html").read_text())
    shown = "".join(page.text)
    assert all(row["answer"] in shown for row in rows)
    metrics = [json.loads(line) for line in (stories_run / "metrics.jsonl").open()]
    held_out = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    assert [step for step, _ in held_out] == [0, 2, 4]
    assert_drawn(polyline(page, "held out"), held_out)
    assert_drawn(polyline(page, "train"), [(r["step"], r["loss"]) for r in metrics if "loss" in r])


def test_a_resumed_run_continues_the_same_history(tmp_path, monkeypatch):
    """The demo, crashed at step 4 (its checkpoint: step 2; evaluated at 1, 2 and 3), then
    resumed: samples.jsonl and token_losses.jsonl are those of the run that never stopped, the
    rows of step 3 not twice."""
    records = tmp_path / "train.json"
    records.write_text((Path(train_sft.__file__).parent / "examples" / "alpaca_demo.json")
                       .read_text())
    def argv(out):
        return [str(a) for a in ["--checkpoint", "tiny", "--data", records, "--out", out,
                                 "--template", "none", "--seq-len", 64, "--batch-size", 2,
                                 "--val-split", 0, "--max-steps", 4, "--eval-every", 1,
                                 "--save-every", 2, "--sample-prompt", "What is 2 + 3?"]]
    train_sft.main(argv(tmp_path / "straight"))
    real, calls = train_sft.train_step, []

    def crash_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(train_sft, "train_step", crash_at_step_4)
        with pytest.raises(RuntimeError):
            train_sft.main(argv(tmp_path / "resumed"))
    resumed = tmp_path / "resumed"
    steps = [json.loads(line)["step"] for line in (resumed / "samples.jsonl").open()]
    assert steps == [0, 1, 2, 3]  # (the crash came before the report of step 4)
    train_sft.main(argv(resumed) + ["--resume"])
    for name in ("samples.jsonl", "token_losses.jsonl"):
        assert (resumed / name).read_text() == (tmp_path / "straight" / name).read_text()
    rows = table_rows((resumed / "report.html").read_text())
    assert [row[0] for row in rows if row[-1] in ("yes", "no")] == \
        ["base (step 0)", "step 1", "step 2", "step 3", "step 4"]


def test_sample_tokens_0_answers_nothing_and_still_reports(tmp_path):
    records = tmp_path / "train.json"
    records.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}] * 4))
    out = tmp_path / "out"
    train_sft.main([str(a) for a in ["--checkpoint", "tiny", "--data", records, "--out", out,
                                     "--template", "none", "--seq-len", 64, "--batch-size", 2,
                                     "--val-split", 0, "--max-steps", 1, "--sample-tokens", 0]])
    assert not (out / "samples.jsonl").exists()
    assert [json.loads(line)["step"] for line in (out / "token_losses.jsonl").open()] == [0, 1]
    shown = "".join(Page((out / "report.html").read_text()).text)
    assert "(no sample answered yet)" in shown and "mean loss of the trained tokens" in shown


# ---------------------------------------------------------------- 4. report.py

def cli(argv, capsys, main=report.main):
    return run_script(main, argv, capsys)


def test_report_py_compares_runs(run_dir, tmp_path, capsys):
    other = tmp_path / "full"
    other.mkdir()
    for name in ("metrics.jsonl", "samples.jsonl", "token_losses.jsonl"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "method": "full", "lr": 1e-5}))
    with open(other / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": 12, "prompt": "Say hi.", "answer": "Hello!", "tokens": 2,
                            "ended_with_end_token": True}) + "\n")
    page_path = tmp_path / "compare.html"
    code, out, err = cli([run_dir, other, "--out", page_path], capsys)
    md_path = tmp_path / "compare.md"
    assert (code, out, err) == (0, f"wrote {page_path} and {md_path}\n", "")
    page = Page(page_path.read_text())
    rows = [cells for cells in table_rows(page_path.read_text())]
    assert ["method", "LoRA, r 8, alpha 16, dropout 0.05, on q,v", "full fine-tuning"] in rows
    assert ["learning rate", "0.0003, 2 warmup steps, cosine to 0; weight decay 0.0",
            "1e-05, 2 warmup steps, cosine to 0; weight decay 0.0"] in rows
    assert not [row for row in rows if row[0] == "model"]  # the same in both: not shown
    assert_drawn(polyline(page, "run: train"), TRAIN)
    assert_drawn(polyline(page, "full: held out"), HELD_OUT)
    # each prompt: the base answer once (the same in both runs), then each run's last answer
    assert ["base (step 0)", "<b>not bold</b> & on", "20", "no"] in rows
    assert ["run, step 10", "Hi there.\nBye.", "14", "yes"] in rows
    assert ["full, step 12", "Hello!", "2", "yes"] in rows
    # the same tables in Markdown, for a terminal or a README
    md = md_path.read_text()
    assert md.startswith("# Runs compared: run, full\n")
    assert "| method | LoRA, r 8, alpha 16, dropout 0.05, on q,v | full fine-tuning |" in md
    assert "| base (step 0) | <b>not bold</b> & on | 20 | no |" in md
    assert "| run, step 10 | Hi there.↵ Bye. | 14 | yes |" in md
    assert "| full, step 12 | Hello! | 2 | yes |" in md
    # a page of its own is overwritten; any other file is not
    assert cli([run_dir, other, "--out", page_path], capsys)[0] == 0
    notes = tmp_path / "notes.html"
    notes.write_text("mine")
    code, _, err = cli([run_dir, other, "--out", notes], capsys)
    assert (code, err) == (2, f"error: --out {notes} exists and is not a page report.py wrote; "
                              "choose another --out\n")
    assert notes.read_text() == "mine"
    (tmp_path / "mine.md").write_text("mine")
    code, _, err = cli([run_dir, other, "--out", tmp_path / "mine.html"], capsys)
    assert (code, err) == (2, f"error: {tmp_path / 'mine.md'} exists and is not a page report.py "
                              "wrote; choose another --out\n")
    assert (tmp_path / "mine.md").read_text() == "mine"
    assert not (tmp_path / "mine.html").exists()


def table_rows(text: str) -> list[list[str]]:
    """Each table row's cells as text."""
    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.in_cell = [], False

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.rows[-1].append("")
                self.in_cell = True

        def handle_endtag(self, tag):
            self.in_cell = self.in_cell and tag not in ("td", "th")

        def handle_data(self, data):
            if self.in_cell:
                self.rows[-1][-1] += data
    parser = Rows()
    parser.feed(text)
    return parser.rows


def test_report_py_draws_one_run_again(run_dir, capsys):
    code, out, _ = cli([run_dir], capsys)
    assert code == 0
    assert out == f"wrote {run_dir / 'report.html'} and {run_dir / 'report.md'}\n"
    Page((run_dir / "report.html").read_text())


def test_report_py_refuses_what_is_not_a_run(run_dir, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    for path, what in ((tmp_path / "other", "holds no config.json of train_sft.py"),
                       (tmp_path / "absent", "does not exist")):
        code, out, err = cli([run_dir, path], capsys)
        assert (code, out, err) == (2, "", f"error: {path} is not a training run: it {what}\n")
    assert not (Path.cwd() / "compare.html").exists()
