"""Runs compared on one page (report.py RUN_A RUN_B ...): the settings that differ, every run's
loss curves on one plot, and the same prompts answered by each run's base and tuned model. What
each row means is run/report.py's: this page puts several runs' side by side."""
from html import escape
from pathlib import Path

from errors import UserError
from run.report import (GENERATOR, RunLog, answer_cells, by_prompt, endings, key_values,
                        loss_series, md_answer, md_cell, md_table, page, settings, speed,
                        step_name, table, write_text)
from run.svg import COLOURS, line_chart

TITLE = "Runs compared: "


def run_names(runs: list[RunLog]) -> list[str]:
    """Each run's directory name; its path where two runs share a name."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else str(run.out) for name, run in zip(names, runs)]


def differing(runs: list[RunLog]) -> list[list[str]]:
    """[setting, its value in each run] for the settings that are not the same in all."""
    described = [settings(run.config) for run in runs]
    return [[key, *(d[key] for d in described)] for key in described[0]
            if len({d[key] for d in described}) > 1]


def answers_rows(runs: list[RunLog], names: list[str], prompt: str) -> list[tuple]:
    """(who answered, the sample row or None): the base model's answer (once, if every run's
    base said the same), then each run's last."""
    rows, bases = [], {}
    for run, name in zip(runs, names):
        answered = by_prompt(run.samples).get(prompt, [])
        if answered and answered[0]["step"] == 0:
            bases.setdefault(answered[0]["answer"], (name, answered[0]))
        if answered and answered[-1]["step"] > 0:
            rows.append((f"{name}, {step_name(answered[-1]['step'])}", answered[-1]))
        elif not answered:
            rows.append((name, None))
    if len(bases) == 1:
        return [("base (step 0)", row) for _, row in bases.values()] + rows
    return [(f"{name}, base (step 0)", row) for name, row in bases.values()] + rows


def summary(runs: list[RunLog], names: list[str]) -> tuple:
    """What both pages show: the settings that differ, the speed and loss numbers every run
    has, and how many sample answers stop, at the base and at the end."""
    numbers = [speed(run) for run in runs]
    keys = [key for key in numbers[0] if all(key in n for n in numbers)]
    stops = [{step: f"{ended} of {total}" for step, ended, total in endings(run.samples)}
             for run in runs]
    stop_rows = [[name, s.get(0, "-"), s[max(s)] if s else "-"] for name, s in zip(names, stops)]
    return differing(runs), [[key, *(n[key] for n in numbers)] for key in keys], stop_rows


def prompts_of(runs: list[RunLog]) -> list[str]:
    return list(dict.fromkeys(row["prompt"] for run in runs for row in run.samples))


def compare_html(runs: list[RunLog]) -> str:
    names = run_names(runs)
    series = [s for i, (run, name) in enumerate(zip(runs, names))
              for s in loss_series(run, COLOURS[i % len(COLOURS)], prefix=f"{name}: ")]
    differ, numbers, stops = summary(runs, names)

    def cells(rows):
        return [[escape(str(cell)) for cell in row] for row in rows]
    body = ["<h2>Runs</h2>",
            key_values({name: str(run.out) for name, run in zip(names, runs)}),
            "<h2>Settings that differ</h2>",
            table(["setting", *map(escape, names)], cells(differ))
            if differ else "<p>None: the runs have the same settings.</p>",
            "<h2>Loss</h2>",
            line_chart(series, "optimizer step", "loss per target token"),
            table(["", *map(escape, names)], cells(numbers)),
            "<h2>Do the answers stop?</h2>",
            table(["run", "base (step 0)", "last"], cells(stops)),
            "<h2>The same prompts, answered by each</h2>"]
    for prompt in prompts_of(runs):
        body.append(f'<h3>Prompt: <span class="answer">{escape(prompt)}</span></h3>')
        rows = [[escape(who), *(answer_cells(row) if row else ["(not asked)", "", ""])]
                for who, row in answers_rows(runs, names, prompt)]
        body.append(table(["answered by", "answer", "tokens", "ends?"], rows))
    return page(TITLE + ", ".join(names), body)


def compare_md(runs: list[RunLog]) -> str:
    """The page's tables in Markdown (the curves are the page's alone)."""
    names = run_names(runs)
    differ, numbers, stops = summary(runs, names)
    lines = [f"# {TITLE}{', '.join(names)}", "", "## Settings that differ", ""]
    lines += md_table(["setting", *names], differ) if differ else ["None.", ""]
    lines += ["## Loss", ""] + md_table(["", *names], numbers)
    lines += ["## Do the answers stop?", ""] + md_table(["run", "base (step 0)", "last"], stops)
    lines += ["## The same prompts, answered by each", ""]
    for prompt in prompts_of(runs):
        lines += [f"**{md_cell(prompt)}**", ""]
        lines += md_table(["answered by", "answer", "tokens", "ends?"],
                          [[who, *(md_answer(row) if row else ["(not asked)", "", ""])]
                           for who, row in answers_rows(runs, names, prompt)])
    return "\n".join(lines)


def write_comparison(runs: list[RunLog], path: Path) -> Path:
    """Write the page to `path` and its Markdown beside it (the same name, .md); a file there
    that this project did not write is refused, before either is written."""
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give the name of the page to write")
    md_path = path.with_suffix(".md")
    for target, ours in ((path, GENERATOR), (md_path, "# " + TITLE)):
        if target.exists() and ours not in target.read_text(errors="replace")[:1000]:
            raise UserError(f"{'--out ' if target == path else ''}{target} exists and is not a "
                            "page report.py wrote; choose another --out")
    write_text(path, compare_html(runs))
    write_text(md_path, compare_md(runs))
    return md_path
