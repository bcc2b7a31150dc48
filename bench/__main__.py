"""`python -m bench ...` (from the project root) runs bench/bench.py: see its --help."""
from bench.bench import main
from errors import run_cli

run_cli(main)
