"""Shared test fixtures: where the real files of ../shared live, and tiny configs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test with the reason when the folder is absent (CI has it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the real test files live in ../shared beside the repository")
    return path
