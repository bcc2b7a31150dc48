"""A training run's report, drawn again, or runs compared on one page.

    python report.py out                          # out/report.html and out/report.md
    python report.py runs/answers runs/prompt     # compare.html (and compare.md): the settings
                                                  # that differ, the loss curves on one plot, the
                                                  # same prompts answered by each run

train_sft.py writes out/report.html itself at each evaluation (run/report.py); this draws it again
from the run's files, e.g. for a run of an older version.
"""
from pathlib import Path

from errors import ArgumentParser, run_cli
from run.compare import write_comparison
from run.report import read_run, write_report


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="the --out directory of a training run")
    p.add_argument("--out", default="compare.html",
                   help="where the comparison of several runs goes, and its Markdown with the same "
                   "name and .md (default: %(default)s)")
    args = p.parse_args(argv)
    runs = [read_run(path) for path in args.runs]  # (each one a run, before anything is written)
    if len(runs) == 1:
        write_report(runs[0].out)
        print(f"wrote {runs[0].out / 'report.html'} and {runs[0].out / 'report.md'}")
    else:
        md_path = write_comparison(runs, Path(args.out))
        print(f"wrote {args.out} and {md_path}")


if __name__ == "__main__":
    run_cli(main)
