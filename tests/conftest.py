"""Shared test fixtures: where the real files of ../shared live, and tiny configs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from tokenizer import Tokenizer  # noqa: E402  (after the sys.path line above)


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test with the reason when the folder is absent (CI has it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the real test files live in ../shared beside the repository")
    return path


# The real tokenizers of ../shared, shared by the tokenizer and data tests.

@pytest.fixture(scope="module")
def llama2():
    return Tokenizer.from_file(shared_path("models", "llama2-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_file(shared_path("models", "llama3-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def tok512():
    return Tokenizer.from_file(shared_path("models", "stories260K", "tok512.model"))
