"""The output directory of a training run: what train_sft.py writes, and how it resumes.

    out/config.json      the settings, where the inputs are and what they hold: --resume checks them
    out/checkpoint.pt    trainable weights, AdamW state, step, RNG states, in one atomic file
    out/metrics.jsonl    one row per step and per evaluation (run/run_metrics.py)
    out/loss.png         the curves, drawn at the end (if matplotlib is installed)
    out/.lock            locked while a run uses the directory, so that two runs never share it

A run writes only into a new or empty directory, or into a run directory of this project
(recognised by its config.json): never into a directory holding files it did not write, nor into
one that is or holds one of its inputs (a new directory inside a model's is fine: the run writes
only inside it). What `prepare_out` does with --out:

    new, or empty                          start
    a run that has no checkpoint.pt yet    start it over: it stopped before saving, nothing is lost
    a run with a checkpoint.pt             continue it with --resume; refuse without
    a finished run whose checkpoint.pt     refuse: its model or adapter would be overwritten
      was deleted
    anything else                          refuse, before writing anything

`processes`: run/processes.py (one process, or torchrun's).
"""
import errno
import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from formats.files import atomic_write, write_json
from errors import UserError, disk_full_cause
from run.processes import ONE_PROCESS
from run.resume import INPUTS, check_resume, damaged, describe_inputs, going_on_note, settings_of

RUN_FORMAT = 1  # written into config.json: marks a directory as a run of this project
CONFIG, CHECKPOINT, METRICS, LOCK = "config.json", "checkpoint.pt", "metrics.jsonl", ".lock"
RESULTS = ("adapter", "peft", "model", "hf")  # what a finished run writes (train_sft.finish)
# atomic_write's temporary files: "." + final name + "." + mkstemp's 8 random characters + ".tmp"
TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# Keys that every version of train_sft.py wrote into config.json, before RUN_FORMAT existed.
OLD_RUN_KEYS = {"out", "data", "method", "seed", "lr", "batch_size", "resume"}

_held_locks = {}  # run directory (resolved) -> its open lock file, locked until this process ends
_started = {}  # run directory (resolved) -> what prepare_out created there (see undo_start)


# ---------------------------------------------------------------- what --out holds

def run_config(directory) -> dict | None:
    """The config.json of a run directory of this project, or None if `directory` is not one."""
    try:
        config = json.loads((Path(directory) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config if _is_run_config(config) else None


def _is_run_config(config) -> bool:
    return isinstance(config, dict) and ("run_format" in config or OLD_RUN_KEYS <= config.keys())


def existing_run(out: Path) -> dict | None:
    """The config of the run in `out`; None if `out` is new or empty (but for our lock file and
    temporary files). A directory holding anything else is refused: we did not write it."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"cannot write to --out {out}: it is a file, not a directory")
    try:
        names = sorted(p.name for p in out.iterdir() if not _ours_to_ignore(p.name))
        text = (out / CONFIG).read_text() if CONFIG in names else None
    except OSError as e:
        raise UserError(f"cannot read --out {out}: {e.strerror}") from None
    if not names:
        return None
    if text is not None:
        try:
            config = json.loads(text)
        except ValueError as e:
            if CHECKPOINT in names or METRICS in names:  # our run, with its config.json damaged
                raise UserError(f"{out / CONFIG} is damaged (not readable JSON: {e}); restore it "
                                "(it holds the run's settings), or choose another --out") from None
            config = None
        ours = CHECKPOINT in names or METRICS in names
        if _is_run_config(config) or (ours and isinstance(config, dict)):
            problem = _config_problem(config)
            if problem:
                raise UserError(f"{out / CONFIG} is damaged ({problem}); restore it (it holds the "
                                "run's settings), or choose another --out")
            return config
        if ours:  # our run, its config.json overwritten by something else
            raise UserError(f"{out / CONFIG} is damaged (a JSON {_json_kind(config)}, not a run's "
                            "settings); restore it (it holds the run's settings), or choose "
                            "another --out")
    if text is not None:  # say what the config.json is that is not ours
        names[names.index(CONFIG)] = f"{CONFIG}: {_not_ours(text)}"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise UserError(f"--out {out} holds files this project did not write ({shown}); a run writes "
                    "only into a new or empty directory, or into its own run directory: choose "
                    "another --out")


def _not_ours(text: str) -> str:
    """Why a config.json is not a run's of this project, in a few words."""
    try:
        config = json.loads(text)
    except ValueError:
        return "not JSON"
    if isinstance(config, dict):
        return "not a run's settings"
    return f"a JSON {_json_kind(config)}, not a run's settings"


def _json_kind(value) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "number")


def _config_problem(config: dict) -> str | None:
    """What is wrong with the parts of a run's config.json that --resume reads as structures (a
    hand edit, another program's file), or None. Other settings are only compared: a wrong value
    there is named as a difference."""
    if not _is_run_config(config):
        return "not a run's settings: it lacks run_format"
    inputs = config.get("inputs", {})
    if not isinstance(inputs, dict):
        return f"its inputs are a JSON {_json_kind(inputs)}, not an object"
    for name, described in inputs.items():
        if described is None:
            continue
        if not isinstance(described, dict) or not isinstance(described.get("path"), str):
            return f"its inputs.{name} is not an object with a path"
        if "sha256" in described and not (isinstance(described["sha256"], str)
                                          and type(described.get("bytes")) is int):
            return f"its inputs.{name} has no size and sha256 as train_sft.py writes them"
    for key, kind in (("history", list), ("effective", dict), ("lora", dict)):
        if key in config and not isinstance(config[key], kind):
            return f"its {key} is a JSON {_json_kind(config[key])}"
    return None


def _ours_to_ignore(name: str) -> bool:
    """Our lock file and temporary files: they alone do not make a directory a run."""
    return name == LOCK or TEMP_FILE.fullmatch(name) is not None


def check_out_path(out: Path):
    """--out must be a path this system can use: not a symbolic link that leads to itself, not a
    name longer than the file system allows."""
    try:
        out.resolve()
        out.exists()
    except RuntimeError:  # (Python 3.11's resolve says "Symlink loop"; later ones raise ELOOP)
        raise UserError(f"--out {out} is a symbolic link that leads back to itself (a loop); "
                        "choose another --out") from None
    except OSError as e:
        loop = " (a loop)" if e.errno == errno.ELOOP else ""
        raise UserError(f"cannot use --out {out}: {e.strerror}{loop}; choose another --out") \
            from None


@contextmanager
def writing(path: Path):
    """A write into the run directory that fails for a reason the user can fix (a full disk, a
    read-only or immutable directory, a name too long): one line naming the file. What is on disk
    stays as it was: every save is atomic, and --resume skips a torn line of metrics.jsonl."""
    try:
        yield
    except OSError as e:
        reason = disk_full_cause(e) or e.strerror or str(e)
        raise UserError(f"cannot write {path}: {reason}; the run stopped, and what it wrote before "
                        "is kept") from None


def refuse_inputs_inside(out: Path, settings: dict, inputs: dict):
    """--out must not be, or contain, a file or directory the run reads."""
    where = out.resolve()
    for name in INPUTS:
        if inputs[name] is None:
            continue
        path = Path(inputs[name]["path"])
        if path == where or where in path.parents:
            flag = "--" + name.replace("_", "-")
            relation = "is" if path == where else "contains"
            raise UserError(f"--out {out} {relation} the {flag} {settings[name]}: a run never "
                            "writes where its inputs are; choose another --out")


# ---------------------------------------------------------------- taking --out for this run

def lock_run_dir(out: Path):
    """An exclusive flock on out/.lock, held until this process ends (the OS releases it even after
    kill -9), so that a second run into the same --out stops at once instead of mixing its files
    with ours. The file holds the pid of the run that has it, for the message."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = out.resolve()
        earlier = _held_locks.pop(key, None)
        if earlier:  # this process used out before (tests call train_sft.main again): let go first
            earlier.close()
        lock = open(out / LOCK, "a+")
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UserError(f"another run is using {out} (pid {holder}); wait for it to end, or choose "
                        "another --out") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held_locks[key] = lock


def remove_temp_files(out: Path):
    """Remove the temporary files of saves that a kill -9 or a power cut interrupted (a full
    fine-tune's is gigabytes). Only under the lock: then no save of a live run is writing them."""
    folders = [out] + [out / name for name in RESULTS if (out / name).is_dir()]
    stale = [p for folder in folders for p in folder.iterdir()
             if TEMP_FILE.fullmatch(p.name) and p.is_file()]
    if not stale:
        return
    mib = sum(p.stat().st_size for p in stale) / 2**20
    for p in stale:
        p.unlink()
    files = "file" if len(stale) == 1 else "files"
    print(f"note: removed {len(stale)} temporary {files} left by interrupted saves ({mib:.1f} MiB)")


def start_over(out: Path, write: bool):
    """A run that stopped before its first checkpoint: its rows in metrics.jsonl are of no use."""
    if write:
        (out / METRICS).unlink(missing_ok=True)
        (out / "loss.png").unlink(missing_ok=True)


def prepare_out(args, write=True) -> Path:
    """Check --out and take it for this run (see the module docstring); return it as a Path.
    `args` is a TrainConfig (or argparse.Namespace). Every refusal is one line, before anything
    is written. write=False (torchrun ranks other than 0): check only; rank 0 writes and locks."""
    out = Path(args.out)
    settings = settings_of(args)
    inputs = describe_inputs(settings)  # (a missing --data is said first, before anything of --out)
    check_out_path(out)
    refuse_inputs_inside(out, settings, inputs)
    existing_run(out)  # refuses another's directory before anything, even the lock file, is written
    if write:
        created = _what_does_not_exist(out)
        lock_run_dir(out)
        with writing(out):
            remove_temp_files(out)
    old = existing_run(out)  # (read again: now no other run can change it)
    saved = (out / CHECKPOINT).exists()
    results = [name for name in RESULTS if (out / name).exists()]
    if results and not saved:  # its checkpoint.pt was deleted, e.g. to save space
        raise UserError(f"{out} holds the results of a finished run ({', '.join(results)}) and no "
                        f"{CHECKPOINT}; choose another --out")
    if args.resume and old is None:
        raise UserError(f"--resume: {out} holds no run (no {CONFIG}); leave out --resume to start "
                        "one")
    history = []  # what a resumed run changed, and from which step (see going_on_note)
    if args.resume and saved:
        changes = check_resume(out / CHECKPOINT, old, settings, inputs)
        step = read_state(out / CHECKPOINT, peek=True)["step"]  # (checked before the model loads)
        history = old.get("history", [])
        if changes:
            if write:
                print(going_on_note(changes, step))
            history = history + [{"step": step, **changes}]
    elif saved:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    elif old is not None:  # stopped before its first checkpoint: nothing to lose, start it over
        if write and args.resume:
            print(f"--resume: {out} has no checkpoint yet (the run stopped before its first save); "
                  "starting from step 0")
        elif write:
            print(f"note: {out} holds a run that stopped before its first checkpoint; "
                  "starting it over")
        start_over(out, write)
    if (out / METRICS).exists() and not (out / METRICS).is_file():
        raise UserError(f"{out / METRICS} is not a file: a run writes its metrics there; move it "
                        "away, or choose another --out")
    if write:
        config = {**settings, "run_format": RUN_FORMAT, "inputs": inputs}
        with writing(out / CONFIG):
            write_json(out / CONFIG, {**config, "history": history} if history else config)
        _started[out.resolve()] = created
    return out


def _what_does_not_exist(out: Path) -> dict:
    """What prepare_out is about to create (undo_start removes it if the start fails): the
    folders of --out that do not exist yet, innermost first, and the lock file; and config.json's
    text as it is now (None: absent)."""
    folders = [folder for folder in [out, *out.parents] if not folder.exists()]
    config = (out / CONFIG).read_text() if (out / CONFIG).is_file() else None
    return {"folders": folders, "lock": not (out / LOCK).exists(), "config": config}


def undo_start(out: Path):
    """A run that failed before its first step (a bad input, Ctrl-C while loading, too little
    memory) takes back what prepare_out created, so that failed starts do not pile up: only that,
    never a file it found there (a folder is removed only if nothing else was put in it)."""
    created = _started.pop(out.resolve(), None)
    if created is None:
        return
    if created["config"] is None:
        (out / CONFIG).unlink(missing_ok=True)
    else:  # a resumed run: its settings as they were
        atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(created["config"]))
    if created["lock"]:
        _held_locks.pop(out.resolve()).close()
        (out / LOCK).unlink(missing_ok=True)
    for folder in created["folders"]:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was put there meanwhile
            return


def record_effective(out: Path, given, effective):
    """Settings the run had to change (--seq-len beyond the model's context, --warmup-steps longer
    than the run) go into config.json as "effective"; the given values stay where --resume
    compares them."""
    before, after = settings_of(given), settings_of(effective)
    changed = {key: value for key, value in after.items() if before.get(key) != value}
    if changed:
        config = json.loads((out / CONFIG).read_text())
        with writing(out / CONFIG):
            write_json(out / CONFIG, {**config, "effective": changed})


def first_line(e: Exception) -> str:
    """An exception's message cut to one line (torch's can run to dozens)."""
    lines = str(e).strip().splitlines() or [""]
    return lines[0][:200]


# ---------------------------------------------------------------- checkpoint.pt

def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def save_state(out: Path, model, optimizer, scaler, step, processes=ONE_PROCESS):
    """Everything needed to continue exactly, in ONE file written atomically (write + rename):
    trainable weights, AdamW moments, step (which fixes the data position and the schedule) and
    each rank's RNG state (dropout masks). Under torchrun every rank takes part (the shards are
    gathered) and rank 0 writes."""
    model_state, optimizer_state = processes.training_state(model, optimizer)
    rng = processes.rng_states(_rng_state())
    if not processes.is_main:
        return
    state = {"model": model_state, "optimizer": optimizer_state, "step": step, "rng": rng,
             "scaler": scaler.state_dict()}
    with writing(out / CHECKPOINT):
        atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def read_state(path: Path, peek=False) -> dict:
    """checkpoint.pt as save_state wrote it, or one line saying it is damaged. peek: map the file
    instead of reading it (a look at its step and structure before the model loads)."""
    try:  # weights_only: an untrusted file gets to hold tensors, not code
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=peek)
    except Exception as e:  # truncated, random bytes, not a checkpoint: torch raises many kinds
        raise UserError(damaged(path, f"{type(e).__name__}: {first_line(e)}")) from None
    problem = _state_problem(state)
    if problem:
        raise UserError(damaged(path, problem))
    return state


def _state_problem(state) -> str | None:
    """What is wrong with the structure of a training state (a hand edit, another program's
    file), or None: checked before anything of it reaches the model, AdamW or the RNG."""
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng"} <= state.keys():
        return "not a training state written by train_sft.py"
    step = state["step"]
    if type(step) is not int or step < 0:  # (a float or a negative step would skew the schedule)
        return f"its step is {step!r}, not a whole number >= 0"
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in weights.values()):
        return "its model is not a set of named tensors"
    if not isinstance(state["optimizer"], dict) or not isinstance(state.get("scaler") or {}, dict):
        return "its optimizer state is not as torch writes it"
    rng = state["rng"]
    if not isinstance(rng, list) or not rng or not all(_is_rng_state(r) for r in rng):
        return "its random states are not as torch writes them"
    return None


def _is_rng_state(saved) -> bool:
    """A state as _rng_state returns it: torch's generator states are byte tensors of one size."""
    def same_kind(tensor, like) -> bool:
        return (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
                and tensor.shape == like.shape)
    if not isinstance(saved, dict) or not same_kind(saved.get("cpu"), torch.get_rng_state()):
        return False
    if "cuda" in saved and torch.cuda.is_available():
        return same_kind(saved["cuda"], torch.cuda.get_rng_state())
    return True


def load_state(out: Path, model, optimizer, scaler, processes=ONE_PROCESS) -> int:
    """Restore what save_state wrote; return the step to continue from. No checkpoint.pt yet:
    step 0 (prepare_out has said that the run starts over)."""
    path = out / CHECKPOINT
    if not path.exists():
        return 0
    state = read_state(path)
    missing = _trainable_names(model) - set(state["model"])
    if missing:
        raise UserError(f"--resume: {path} lacks {len(missing)} trainable tensors "
                        f"(e.g. {sorted(missing)[0]})")
    try:
        processes.load_training_state(model, optimizer, state["model"], state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # another model's, or edited
        raise UserError(f"--resume: {path} does not fit this model ({first_line(e)})") from None
    if state.get("scaler"):  # (fp16's loss scale; {} or None when the run had none)
        scaler.load_state_dict(state["scaler"])
    rank = processes.rank
    if rank >= len(state["rng"]):
        raise UserError(damaged(path, f"it holds the random states of {len(state['rng'])} ranks"))
    rng = state["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]
