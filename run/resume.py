"""What --resume compares: every setting that changes the trained weights, and the inputs by
what they hold, so that a resumed run is the run it claims to continue (run/run_dir.py calls it).

A data file (or folder) is the same input when it holds the same bytes (size and sha256 in
config.json), wherever it lies; several --data are compared one by one, with their weights; a
checkpoint or a tokenizer when it is the same path, resolved. A difference is named in the one
error line, and config.json is not rewritten.
"""
import dataclasses
import hashlib
import zipfile
from pathlib import Path

from errors import UserError
from formats.data_files import data_paths
from records import parse_source

# Settings that change the trained weights and make a checkpoint meaningless for another value (the
# model, its tokenizer, the data and how it is cut into steps, the adapters' shape, the precision):
# a resumed run must use the same ones. Nested groups are flattened: TrainConfig's lora.r is
# "lora_r" (see flat_settings).
RESUME_MUST_MATCH = ("checkpoint", "tokenizer", "data", "val_data", "val_split", "columns",
                     "template", "train_on_prompt", "train_on", "method", "lora_r", "lora_alpha",
                     "lora_dropout", "lora_targets", "lora_rslora", "lora_dora", "seq_len",
                     "batch_size", "grad_accum", "weight_decay", "seed", "precision", "pure_bf16",
                     "adamw_state", "loss_chunk", "packing", "neftune_alpha", "world_size")
# Settings a run may go on with after a change: how fast and how long it learns from here (a lower
# --lr after a diverged run, a longer run). The weights from the checkpoint on are then not those
# of an uninterrupted run: a note says so, and config.json keeps the history of such changes.
# (weight_decay is not among them: AdamW's saved state brings back the old one.)
RESUME_GOES_ON_WITH = ("lr", "warmup_steps", "grad_clip", "epochs", "max_steps")
# Settings that may change on --resume: they decide what is shown or saved, where, or how fast.
# --grad-ckpt recomputes the same forward pass, with the same dropout masks. --compile and --device
# change only how the same arithmetic is rounded (fused kernels, another processor): the run is
# the same training, not bit for bit the same numbers, and turning them off or on may be what
# lets a run go on at all (a compiler error, an out-of-memory error, another machine). So do
# --cuda-graphs (the same kernels, replayed) and --pad-to-multiple-of (the same batches, with more
# padding, which the loss masks).
# --fp8 too: the products are rounded to 8 bits instead of 16, the weights and adapters are the
# same ones (a run goes on without it on a GPU that has no FP8). --early-stop decides only when the
# run ends, like a cadence: the steps it trains are the same. (--neftune-alpha changes every step's
# inputs, as dropout does: it must match.)
# Of these, the cadences, the sample prompts and --early-stop are noted in the history too
# (RECORDED).
RESUME_MAY_DIFFER = ("out", "resume", "eval_every", "save_every", "sample_prompt",
                     "sample_tokens", "merge", "device", "grad_ckpt", "compile", "cuda_graphs",
                     "pad_to_multiple_of", "fp8", "early_stop")
RECORDED = RESUME_GOES_ON_WITH + ("eval_every", "save_every", "sample_prompt", "sample_tokens",
                                  "early_stop")
RUN_LENGTH = ("epochs", "max_steps")  # the cosine schedule ends at the run's length
INPUTS = ("checkpoint", "tokenizer", "data", "val_data")  # compared by where they are, not as text
# Names of today's config.json (flat) for the settings TrainConfig now groups under "lora".
OLD_NAMES = {"lora_rslora": "rslora", "lora_dora": "dora"}


def settings_of(config) -> dict:
    """The run's settings as a dict of JSON values: `config` is a dataclass (TrainConfig) or an
    argparse.Namespace. Nested dataclasses stay nested ({"lora": {"r": 16, ...}})."""
    if dataclasses.is_dataclass(config):
        settings = dataclasses.asdict(config)
    else:
        settings = dict(vars(config))
    return {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}


def flat_settings(settings: dict) -> dict:
    """Nested groups as one level, as the flags spell them: {"lora": {"r": 16}} becomes
    {"lora_r": 16}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key != "inputs":
            flat.update({f"{key}_{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_inputs(settings: dict) -> dict:
    """Where the inputs are, resolved (so that another spelling of the same path is the same input),
    and for the data what it holds (size and sha256: a few seconds for gigabytes of data), so that
    --resume notices a file that changed. "data" is a list, one entry per --data. A data file that
    does not exist is said here, before anything about --out; any other fault of an input is left
    for the code that reads it."""
    inputs = {}
    for name in INPUTS:
        given = settings.get(name)
        if not given:
            inputs[name] = None
        elif name == "data":
            inputs[name] = [describe_data(text, name) for text in given]
        elif name == "val_data":
            inputs[name] = describe_data(given, name)
        else:
            inputs[name] = {"path": str(resolved(given, name))}
    return inputs


def resolved(given: str, name: str) -> Path:
    path = Path(given).resolve()
    try:
        path.exists()
    except OSError as e:  # a name longer than the file system allows
        raise UserError(f"cannot read --{name.replace('_', '-')} {given}: {e.strerror}") from None
    return path


def describe_data(text: str, name: str) -> dict:
    """{path, bytes, sha256} of a data file, or of a folder's data files together (the sha256 of
    their names and sha256s, one "name sha256" line each); with "weight" when --data gave one."""
    given, weight = parse_source(text)
    path = resolved(given, name)
    files = data_paths(given)  # (one line if it does not exist, as records.load_records says)
    described = {"path": str(path), "bytes": sum(file.stat().st_size for file in files)}
    if path.is_dir():
        lines = "".join(f"{file.name} {sha256_of(file)}\n" for file in files)
        described["sha256"] = hashlib.sha256(lines.encode()).hexdigest()
    else:
        described["sha256"] = sha256_of(path)
    if weight is not None:
        described["weight"] = weight
    return described


def check_resume(path: Path, old: dict, settings: dict, inputs: dict) -> dict:
    """Refuse (one line naming every difference, nothing rewritten) a resumed run whose settings or
    inputs would make its checkpoint `path` (out/checkpoint.pt) meaningless, or a checkpoint that
    is not one. Returns the settings of RECORDED that changed: {name: [before, now]}."""
    out = path.parent
    changed = changed_settings(old, {**settings, "inputs": inputs})
    if changed:
        raise UserError(f"--resume: {out} was trained with different settings: "
                        f"{', '.join(changed)}; resume with the same ones, or choose another --out "
                        "for a new run")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip: a quick look before the model loads
        raise UserError(damaged(path, "not a zip archive: truncated or overwritten"))
    return {key: [old[key], settings.get(key)] for key in RECORDED
            if key in old and old[key] != settings.get(key)}


def going_on_note(changes: dict, step: int) -> str:
    """The one line that says what a resumed run goes on with (changes: check_resume's)."""
    listed = ", ".join(f"--{key.replace('_', '-')} {before} → {now}"
                       for key, (before, now) in changes.items())
    note = f"note: --resume from step {step} with {listed}"
    if any(key in RUN_LENGTH for key in changes):
        note += " (the learning rate's cosine now ends at the new length)"
    if any(key in RESUME_GOES_ON_WITH for key in changes):
        note += ": from here the run is not bit for bit the one it would have been uninterrupted"
    return note + "; config.json keeps the history"


def changed_settings(old: dict, new: dict) -> list[str]:
    """'name old → new' for every setting of RESUME_MUST_MATCH that differs. Settings that an
    older run did not record are not compared: it cannot say what they were."""
    old_flat, new_flat = flat_settings(old), flat_settings(new)
    changed = []
    for key in RESUME_MUST_MATCH:
        recorded, before = _setting(old_flat, key)
        if not recorded:
            continue
        now = _setting(new_flat, key)[1]
        if key in INPUTS:
            difference = input_difference(key, before, now, old.get("inputs"), new["inputs"])
            if difference:
                changed.append(difference)
        elif before != now:
            changed.append(f"{key} {_shown(before)} → {_shown(now)}")
    return changed


def _shown(value) -> str:
    """A setting as the error line shows it: a long one (a chat template's source) cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "…" + text[-1]


def _setting(flat: dict, key: str) -> tuple[bool, object]:
    """(recorded?, value) of a flattened setting, under its name or the name today's config uses."""
    for name in (key, OLD_NAMES.get(key)):
        if name in flat:
            return True, flat[name]
    return False, None


def input_difference(key: str, before, now, old_inputs: dict | None, new_inputs: dict):
    """Data files are the same when they hold the same bytes, wherever they are; a checkpoint or
    a tokenizer when it is the same path, resolved (hashing a model of gigabytes would be slow).
    "data" compares its sources in order. Returns how it differs, or None."""
    old_in = (old_inputs or {}).get(key)
    if old_inputs is None and before:  # a run of the previous version: only the path as given
        old_in = {"path": str(Path(before if isinstance(before, str) else before[0]).resolve())}
    new_in = new_inputs.get(key)
    if key != "data":
        return _one_difference(key, before, now, old_in, new_in)
    before, now = _listed(before), _listed(now)  # (before: one path, in a previous version's run)
    old_in, new_in = _listed(old_in), _listed(new_in)
    if len(before) != len(now) or len(old_in) != len(new_in):
        return f"{key} {_sources(before)} → {_sources(now)}"
    for was, is_now, old_one, new_one in zip(before, now, old_in, new_in):
        difference = _one_difference(key, was, is_now, old_one, new_one)
        if difference:
            return difference
    return None


def _listed(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _sources(texts: list) -> str:
    return repr(texts[0]) if len(texts) == 1 else repr(texts)


def _one_difference(key: str, before, now, old_in: dict | None, new_in: dict | None):
    if old_in is None or new_in is None:
        return None if old_in is new_in else f"{key} {before!r} → {now!r}"
    if old_in.get("weight") != new_in.get("weight"):
        return f"{key} {before!r} → {now!r}"
    if "sha256" in old_in and "sha256" in new_in:
        if (old_in["sha256"], old_in["bytes"]) == (new_in["sha256"], new_in["bytes"]):
            return None
        if old_in["path"] == new_in["path"]:
            old_hash, new_hash = old_in["sha256"][:12], new_in["sha256"][:12]
            hashes = f"sha256 {old_hash}… → {new_hash}…"
            return f"{key} {now!r} changed since the run started ({hashes})"
        return f"{key} {before!r} → {now!r} (other content)"
    return None if old_in["path"] == new_in["path"] else f"{key} {before!r} → {now!r}"


def damaged(path: Path, reason: str) -> str:
    return f"--resume: {path} is damaged ({reason}); delete it to start this run over from step 0"
