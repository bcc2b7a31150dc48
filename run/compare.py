"""Runs compared on one page (report.py RUN_A RUN_B ...): the settings that differ, every run's
loss curves on one plot, and the same prompts answered by each run's base and tuned model. What
each row means is run/report.py's: this page puts several runs' side by side."""
from html import escape
from pathlib import Path

from errors import UserError
from run.report import (GENERATOR, RunLog, by_prompt, endings, key_values, loss_series, page,
                        settings, speed, step_name, table, answer_cells, write_text)
from run.svg import COLOURS, line_chart


def run_names(runs: list[RunLog]) -> list[str]:
    """Each run's directory name; its path where two runs share a name."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else str(run.out) for name, run in zip(names, runs)]


def differing(runs: list[RunLog]) -> list[list[str]]:
    """[setting, its value in each run] for the settings that are not the same in all."""
    described = [settings(run.config) for run in runs]
    return [[key, *(d[key] for d in described)] for key in described[0]
            if len({d[key] for d in described}) > 1]


def answers_rows(runs: list[RunLog], names: list[str], prompt: str) -> list[list[str]]:
    """The base model's answer (once, if every run's base said the same), then each run's last."""
    rows, bases = [], {}
    for run, name in zip(runs, names):
        answered = by_prompt(run.samples).get(prompt, [])
        if answered and answered[0]["step"] == 0:
            bases.setdefault(answered[0]["answer"], (name, answered[0]))
        if answered and answered[-1]["step"] > 0:
            rows.append([f"{escape(name)}, {step_name(answered[-1]['step'])}",
                         *answer_cells(answered[-1])])
        elif not answered:
            rows.append([escape(name), "(not asked)", "", ""])
    if len(bases) == 1:
        base_rows = [["base (step 0)", *answer_cells(row)] for _, row in bases.values()]
    else:
        base_rows = [[f"{escape(name)}, base (step 0)", *answer_cells(row)]
                     for name, row in bases.values()]
    return base_rows + rows


def compare_html(runs: list[RunLog]) -> str:
    names = run_names(runs)
    series = [s for i, (run, name) in enumerate(zip(runs, names))
              for s in loss_series(run, COLOURS[i % len(COLOURS)], prefix=f"{name}: ")]
    differ = differing(runs)
    numbers = [speed(run) for run in runs]
    keys = [key for key in numbers[0] if all(key in n for n in numbers)]
    stops = [{step: f"{ended} of {total}" for step, ended, total in endings(run.samples)}
             for run in runs]
    prompts = list(dict.fromkeys(row["prompt"] for run in runs for row in run.samples))
    body = ["<h2>Runs</h2>",
            key_values({name: str(run.out) for name, run in zip(names, runs)}),
            "<h2>Settings that differ</h2>",
            table(["setting", *map(escape, names)], [[escape(c) for c in row] for row in differ])
            if differ else "<p>None: the runs have the same settings.</p>",
            "<h2>Loss</h2>",
            line_chart(series, "optimizer step", "loss per target token"),
            table(["", *map(escape, names)],
                  [[escape(key), *(escape(n[key]) for n in numbers)] for key in keys]),
            "<h2>Do the answers stop?</h2>",
            table(["run", "base (step 0)", "last"],
                  [[escape(name), s.get(0, "-"), s[max(s)] if s else "-"]
                   for name, s in zip(names, stops)]),
            "<h2>The same prompts, answered by each</h2>"]
    for prompt in prompts:
        body.append(f'<h3>Prompt: <span class="answer">{escape(prompt)}</span></h3>')
        body.append(table(["answered by", "answer", "tokens", "ends?"],
                          answers_rows(runs, names, prompt)))
    return page("Runs compared: " + ", ".join(names), body)


def write_comparison(runs: list[RunLog], path: Path):
    """Write the page to `path`; a file there that this project did not write is refused."""
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give the name of the page to write")
    if path.exists() and GENERATOR not in path.read_text(errors="replace")[:1000]:
        raise UserError(f"--out {path} exists and is not a page report.py wrote; choose another "
                        "--out")
    write_text(path, compare_html(runs))
