"""Files, read and written safely: the pieces every reader and writer of this project shares.

Writes are atomic (a temporary file renamed into place: a crash leaves the old file whole). Files
are untrusted input: JSON must hold an object, torch files are read with weights_only=True, and
every config value is checked against its rule before anything is built from it. `name_map`
turns one file format's tensor-name tables into {name in the file: our name}.
"""
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from errors import UserError, disk_full_cause
from model import ModelConfig, Rule
from projections import PROJECTIONS
from records import json_type


def name_map(names: dict, layer_names: dict, layer_prefix: str, n_layers: int) -> dict:
    """{name in a file: our name} for every tensor of an n_layers model, from one format's
    tables: `names` {ours: theirs} outside the blocks, `layer_names` {ours: theirs} inside
    each block, where their names sit under layer_prefix.format(layer) and ours under
    'layers.{layer}.'."""
    file_to_ours = {theirs: ours for ours, theirs in names.items()}
    for layer in range(n_layers):
        for ours, theirs in layer_names.items():
            file_to_ours[layer_prefix.format(layer) + theirs] = f"layers.{layer}.{ours}"
    return file_to_ours



def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash mid-write leaves the old file whole.
    (os.replace is atomic on POSIX when both paths are on one filesystem, hence the tmp beside it.)
    The tmp is named .NAME.XXXXXXXX.tmp; run/run_dir.py removes those a kill -9 leaves behind.
    A full disk is a UserError that says the previous file is kept; nothing else is caught."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600): the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # (missing if `write` itself removed it)
        cause = disk_full_cause(e)
        if cause is None:
            raise
        kept = f"the previous {path} is kept" if path.exists() else "nothing was written"
        raise UserError(f"{cause} while writing {path}; {kept}") from None


def save_safetensors(tensors: dict, path, metadata=None):
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


# ---------------------------------------------------------------- reading files (formats.py too)

REQUIRED = object()  # config_value's default for a key the file must have
OBJECT = Rule("an object", lambda value: isinstance(value, dict))


def config_value(values: dict, key: str, path, rule: Rule, default=REQUIRED):
    """values[key] (config.json, params.json, GGUF metadata, ...), or `default` where it is
    absent or null, checked against `rule` (model.py): one line naming the file and the key
    where it is not what the rule says. Every reader of a model's config takes values here."""
    value = values.get(key)
    if value is None and default is REQUIRED:
        raise UserError(f"{path}: not a Llama model config (no {key!r} entry)")
    if value is None:
        return default
    if not rule.holds(value):
        raise UserError(f"{path}: {key} is {value!r}, but it must be {rule.text}")
    return value


def model_config(path, **fields) -> ModelConfig:
    """ModelConfig(**fields) of values read from `path`: what its own checks find names the
    file."""
    try:
        return ModelConfig(**fields)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def check_layer_count(path, config: ModelConfig, n_tensors: int):
    """A config must not claim more layers than the file holds tensors for (each layer has
    its 7 projections and 2 norms). Checked before anything is built per layer (a name table, the
    modules), so a small file that claims 10**7 layers is one line, not gigabytes of memory."""
    per_layer = len(PROJECTIONS) + 2
    if config.n_layers * per_layer > n_tensors:
        raise UserError(f"{path}: the config says {config.n_layers} layers, but the file holds "
                        f"{n_tensors} tensors, too few for that ({per_layer} per layer)")


def read_json(path: Path) -> dict:
    """A JSON file that holds an object (config.json, an index, params.json, ...)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    except RecursionError:  # json recurses once per level of [ or {
        raise UserError(f"{path}: not readable JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object {{...}}, but the file holds "
                        f"{json_type(value)}")
    return value


def read_state_dict(path: Path) -> dict:
    """A torch.save'd {name: tensor}: pytorch_model.bin, Meta's consolidated.*.pth."""
    return state_dict_of(path, read_torch_file(path))


def state_dict_of(path: Path, state) -> dict:
    """`state` (read from `path`), if it is a {name: tensor}."""
    if not isinstance(state, dict) or not all(
            isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in state.items()):
        raise UserError(f"{path}: expected a state dict (tensors by name), but it holds "
                        "other things")
    return state


def read_torch_file(path: Path) -> dict:
    """A file written by torch.save, read without running code from it (weights_only: a
    checkpoint is untrusted input) and without a RAM copy (mmap). Holds a dict."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: it holds more than tensors and plain data, which "
                        f"could run code when loaded ({_refusal_reason(str(e))}); this project "
                        "loads only what torch.load(weights_only=True) accepts") from None
    except Exception as e:
        reason = " ".join(str(e).split())  # (torch's messages can span lines)
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint "
                        f"({type(e).__name__}: {reason})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a dict saved by torch.save, but it holds "
                        f"{type(value).__name__}")
    return value


def _refusal_reason(message: str) -> str:
    """What a file asked for, from torch's page-long weights_only refusal (a note on the
    default, advice, the reason on a line of its own, a link), in the words torch uses."""
    for line in message.splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line.lower().startswith(("unsupported", "trying to load unsupported")):
            return line.split(". ")[0].rstrip(".")
    return "torch.load(weights_only=True) refused it"


def _count_safetensors(files) -> int:
    """How many tensors the files hold, from their headers (nothing is loaded)."""
    count = 0
    for f in files:
        with _open_safetensors(f) as st:
            count += len(st.keys())
    return count


def _read_safetensors(files):
    """(name, tensor) of every tensor of the files, one at a time."""
    for f in files:
        with _open_safetensors(f) as st:
            for key in st.keys():
                yield key, st.get_tensor(key)


@contextmanager
def _open_safetensors(f: Path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(f), framework="pt") as st:
            yield st
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # (its own type too)
        raise UserError(f"{f}: not a readable safetensors file ({e})") from None
