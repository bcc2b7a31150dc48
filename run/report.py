"""out/report.html: what a run did, on one page that opens offline in any browser (no scripts, no
fonts or images from the network; the curves are inline SVG, run/svg.py). out/report.md holds the
same tables, for a terminal or a repository. Both are drawn from the run's files alone
(config.json and the logs of run/run_metrics.py and run/samples.py), rewritten at each evaluation:

    the settings that matter           config.json
    the loss curves, tokens/s, memory  metrics.jsonl
    every sample prompt's answers      samples.jsonl: the base model's (step 0), then the tuned
    and whether they stop                model's at each evaluation
    one training record, token by      token_losses.jsonl: prompt tokens grey, trained tokens
    token                                coloured by their loss, before and after

    python report.py OUT                # draw a run's report again
    python report.py RUN_A RUN_B        # compare runs (run/compare.py)
"""
import statistics
from dataclasses import dataclass
from html import escape
from pathlib import Path

from errors import UserError
from formats.files import atomic_write
from run.run_dir import METRICS, SAMPLES, TOKEN_LOSSES, run_config, writing
from run.run_metrics import is_number, read_metrics
from run.svg import COLOURS, Series, line_chart

GENERATOR = "sft-from-scratch report.py"  # in every page: report.py overwrites only its own pages
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
.answer { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.9;
          white-space: pre-wrap; border: 1px solid #ddd; padding: 0.5em; }
.tokens span { border-radius: 2px; }
.prompt { color: #999; }
.no { color: #b00; } .yes { color: #070; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
"""


@dataclass
class RunLog:
    """A run's directory, read: its settings and its logged rows."""
    out: Path
    config: dict
    metrics: list[dict]
    samples: list[dict]
    token_losses: list[dict]

    @property
    def name(self) -> str:
        return self.out.resolve().name


def is_answer(row: dict) -> bool:
    """A row of samples.jsonl as run/samples.py writes it."""
    return (isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)
            and type(row.get("tokens")) is int)


def is_token_losses(row: dict) -> bool:
    """A row of token_losses.jsonl as run/samples.py writes it."""
    tokens, losses = row.get("tokens"), row.get("losses")
    return (isinstance(tokens, list) and isinstance(losses, list) and len(tokens) == len(losses)
            and all(isinstance(t, str) for t in tokens)
            and all(loss is None or is_number(loss) for loss in losses))


def read_rows(path: Path, fits=lambda row: True) -> list[dict]:
    """The rows of one of the run's logs ([] before it is written). A line that is not such a
    row (torn by a kill, edited by hand) is left out, as --resume leaves it out: the report of a
    run in progress never stops the run."""
    if not path.is_file():
        return []
    try:
        return [row for _, row in read_metrics(path)[0] if fits(row)]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def read_run(directory) -> RunLog:
    """A run directory of train_sft.py, read; anything else is one line."""
    out = Path(directory)
    config = run_config(out)
    if config is None:
        what = "does not exist" if not out.exists() else "holds no config.json of train_sft.py"
        raise UserError(f"{out} is not a training run: it {what}")
    return RunLog(out, config, read_rows(out / METRICS), read_rows(out / SAMPLES, is_answer),
                  read_rows(out / TOKEN_LOSSES, is_token_losses))


# ---------------------------------------------------------------- what the report says

def settings(config: dict) -> dict[str, str]:
    """The settings that decide what a run learns, in words (what the run had to change, such
    as a --seq-len past the model's context, in place of what was given)."""
    effective = config.get("effective")
    c = {**config, **(effective if isinstance(effective, dict) else {})}
    lora = c.get("lora") if isinstance(c.get("lora"), dict) else {}
    method = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (4-bit NF4 base)"}
    described = method.get(c.get("method"), str(c.get("method")))
    if c.get("method") in ("lora", "qlora"):
        described += (f", r {lora.get('r')}, alpha {lora.get('alpha')}, dropout "
                      f"{lora.get('dropout')}, on {lora.get('targets')}"
                      + (", rsLoRA" if lora.get("rslora") else "")
                      + (", DoRA" if lora.get("dora") else ""))
    template = str(c.get("template"))
    if "{{" in template or "{%" in template:
        template = "the model's chat template (jinja)"
    split = c.get("val_split")
    held_out = c.get("val_data") or (f"{split:.0%} of the data" if is_number(split) and split
                                     else "none")
    length = (f"{c['max_steps']} steps" if c.get("max_steps") else f"{c.get('epochs')} epochs")
    return {
        "model": str(c.get("checkpoint") or "the demo's tiny random model (--checkpoint tiny)"),
        "data": ", ".join(map(str, c["data"])) if isinstance(c.get("data"), list) else
                str(c.get("data")),  # (a list: one per --data, each PATH or PATH:WEIGHT)
        "held out": str(held_out),
        "template": template,
        "loss on": ("prompt and answer" if c.get("train_on_prompt") else
                    "the last answer" if c.get("train_on") == "last" else "answers only"),
        "method": described,
        "batch": (f"{c.get('batch_size')} examples × {c.get('grad_accum')} accumulation × "
                  f"{c.get('world_size', 1)} ranks, up to {c.get('seq_len')} tokens each"
                  + (", packed" if c.get("packing") else "")),
        "learning rate": (f"{c.get('lr')}, {c.get('warmup_steps')} warmup steps, cosine to 0; "
                          f"weight decay {c.get('weight_decay')}"),
        "length": length,
        "precision": str(c.get("precision")),
        "seed": str(c.get("seed")),
    }


def loss_series(run: RunLog, colour: str, prefix: str = "") -> list[Series]:
    """The training loss (a line) and the held-out loss (dashed, a dot per evaluation)."""
    train = [(r["step"], r["loss"]) for r in run.metrics if "loss" in r]
    held_out = [(r["step"], r["val_loss"]) for r in run.metrics if "val_loss" in r]
    return [Series(prefix + "train", train, colour),
            Series(prefix + "held out", held_out, colour, dashed=True, markers=True)]


def speed(run: RunLog) -> dict[str, str]:
    """Tokens per second (the median step: the first steps warm up) and the GPU's peak memory."""
    rates = [r["tokens_per_s"] for r in run.metrics if is_number(r.get("tokens_per_s"))]
    peaks = [r["peak_mem_gib"] for r in run.metrics if is_number(r.get("peak_mem_gib"))]
    losses = [r for r in run.metrics if "loss" in r]
    evaluations = [r for r in run.metrics if "val_loss" in r]
    numbers = {"steps logged": str(max((r["step"] for r in run.metrics), default=0))}
    if losses:
        numbers["training loss"] = f"{losses[0]['loss']:.4f} → {losses[-1]['loss']:.4f}"
    if evaluations:
        first, last = evaluations[0], evaluations[-1]
        numbers["held-out loss"] = (f"{first['val_loss']:.4f} (step {first['step']}) → "
                                    f"{last['val_loss']:.4f} (step {last['step']})")
    if rates:
        numbers["tokens/s"] = f"{statistics.median(rates):,.0f} (median step)"
    numbers["peak memory"] = f"{max(peaks):.2f} GiB" if peaks else "not measured (CPU)"
    return numbers


def by_prompt(samples: list[dict]) -> dict[str, list[dict]]:
    """Each prompt's answers, step by step, in the order the prompts were first answered."""
    grouped = {}
    for row in samples:
        grouped.setdefault(row["prompt"], []).append(row)
    return grouped


def endings(samples: list[dict]) -> list[tuple[int, int, int]]:
    """(step, answers that ended with the end token, answers) at each step that answered."""
    steps = {}
    for row in samples:
        counts = steps.setdefault(row["step"], [0, 0])
        counts[0] += bool(row.get("ended_with_end_token"))
        counts[1] += 1
    return [(step, ended, total) for step, (ended, total) in sorted(steps.items())]


def step_name(step: int) -> str:
    return "base (step 0)" if step == 0 else f"step {step}"


# ---------------------------------------------------------------- HTML

def table(header: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table (header None: none); the cells are HTML already (escape text before)."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def key_values(pairs: dict[str, str]) -> str:
    return table(None, [[f"<b>{escape(key)}</b>", escape(value)] for key, value in pairs.items()])


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"generator\" content=\"{GENERATOR}\">\n"
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def answer_cells(row: dict) -> list[str]:
    stops = ('<span class="yes">yes</span>' if row.get("ended_with_end_token")
             else '<span class="no">no</span>')
    return [f'<div class="answer">{escape(row["answer"])}</div>', str(row["tokens"]), stops]


def samples_html(samples: list[dict]) -> list[str]:
    parts = []
    for prompt, rows in by_prompt(samples).items():
        parts.append(f'<h3>Prompt: <span class="answer">{escape(prompt)}</span></h3>')
        parts.append(table(["answered by", "answer", "tokens", "ends?"],
                           [[step_name(r["step"]), *answer_cells(r)] for r in rows]))
    return parts or ["<p>(no sample answered yet)</p>"]


def token_colour(loss: float, worst: float) -> str:
    """Green for a token the model finds easy (loss 0), through yellow, to red at the worst loss
    shown (the same scale before and after)."""
    hue = 120 * (1 - min(loss / worst, 1.0)) if worst > 0 else 120
    return f"hsl({hue:.0f}, 75%, 78%)"


def tokens_html(row: dict, worst: float) -> str:
    spans = []
    for piece, loss in zip(row["tokens"], row["losses"]):
        text = escape(piece.replace("\n", "↵\n"))
        if loss is None:
            spans.append(f'<span class="prompt">{text}</span>')
        else:
            spans.append(f'<span style="background: {token_colour(loss, worst)}" '
                         f'title="loss {loss:.3f}">{text}</span>')
    return f'<div class="tokens">{"".join(spans)}</div>'


def mean_loss(row: dict) -> float:
    trained = [loss for loss in row["losses"] if loss is not None]
    return sum(trained) / max(len(trained), 1)


def record_html(token_losses: list[dict]) -> list[str]:
    """One training record, token by token, before and after (the first and last rows)."""
    if not token_losses:
        return ["<p>(not measured yet)</p>"]
    shown = [token_losses[0]] + token_losses[-1:] if len(token_losses) > 1 else token_losses
    worst = max((loss for row in shown for loss in row["losses"] if loss is not None), default=0)
    parts = ["<p>Grey tokens are the prompt: masked, the model is not trained on them. The "
             "others are trained; their colour is their loss, green (the model expected that "
             f"token) to red (loss {worst:.2f} or more). Hover over a token for its loss.</p>"]
    for row in shown:
        parts.append(f"<h3>{step_name(row['step'])}: mean loss of the trained tokens "
                     f"{mean_loss(row):.3f}</h3>")
        parts.append(tokens_html(row, worst))
    return parts


def endings_rows(samples: list[dict]) -> list[list[str]]:
    return [[step_name(step), f"{ended} of {total}"] for step, ended, total in endings(samples)]


def report_html(run: RunLog) -> str:
    body = ["<h2>Settings</h2>",
            key_values(settings(run.config)),
            "<h2>Loss</h2>",
            line_chart(loss_series(run, COLOURS[0]), "optimizer step", "loss per target token"),
            key_values(speed(run)),
            "<h2>Do the answers stop?</h2>",
            "<p>Answers that end with the end token (within the sample's token limit). A model "
            "that never says it is done rambles on: the most common failure of SFT.</p>",
            table(["model", "answers that stop"], endings_rows(run.samples)),
            "<h2>Answers, before and after</h2>",
            "<p>Greedy answers with the run's template: the base model's before the first step, "
            "then the tuned model's at each evaluation.</p>",
            *samples_html(run.samples),
            "<h2>One training record, token by token</h2>",
            *record_html(run.token_losses)]
    return page(f"Training run {run.name}", body)


# ---------------------------------------------------------------- Markdown

def md_cell(text) -> str:
    """Text as one Markdown table cell: line breaks shown as ↵, pipes escaped."""
    text = str(text).replace("|", "\\|").replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "↵ ")


def md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def md_answer(row: dict) -> list:
    """answer, tokens, ends? of one sample row, as Markdown cells."""
    return [row["answer"], row["tokens"], "yes" if row.get("ended_with_end_token") else "no"]


def record_md(token_losses: list[dict]) -> list[str]:
    if not token_losses:
        return ["(not measured yet)", ""]
    first, last = token_losses[0], token_losses[-1]
    prompt = sum(loss is None for loss in first["losses"])
    rows = [[f"`{md_cell(piece)}`", f"{before:.3f}", f"{after:.3f}"]
            for piece, before, after in zip(first["tokens"], first["losses"], last["losses"])
            if before is not None and after is not None]
    return ([f"{prompt} prompt tokens (not trained), then the trained tokens' loss:", ""]
            + md_table(["token", step_name(first["step"]), step_name(last["step"])], rows))


def report_md(run: RunLog) -> str:
    lines = [f"# Training run {run.name}", "", "## Settings", ""]
    lines += md_table(["setting", "value"], list(settings(run.config).items()))
    lines += ["## Loss", ""] + md_table(["measured", "value"], list(speed(run).items()))
    lines += ["## Do the answers stop?", ""]
    lines += md_table(["model", "answers that stop"], endings_rows(run.samples))
    lines += ["## Answers, before and after", ""]
    for prompt, rows in by_prompt(run.samples).items():
        lines += [f"**{md_cell(prompt)}**", ""]
        lines += md_table(["answered by", "answer", "tokens", "ends?"],
                          [[step_name(r["step"]), *md_answer(r)] for r in rows])
    lines += ["## One training record, token by token", ""] + record_md(run.token_losses)
    return "\n".join(lines)


def write_text(path: Path, text: str):
    with writing(path):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_report(out: Path):
    """Draw out/report.html and out/report.md from what the run has logged so far."""
    run = read_run(out)
    write_text(out / "report.html", report_html(run))
    write_text(out / "report.md", report_md(run))
