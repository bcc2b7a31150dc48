"""Issue 24's SmolLM2-135M measurements in one GPU call: tokens/s of ours (each speed setting)
and of the peer (HF + PEFT, with and without Liger) on Alpaca's real lengths, then the wall time
of the README's 3-epoch LoRA run with train_sft.py. One JSON line each; in order of importance,
each only while the time budget lasts (a line says what was skipped).

    python bench/smollm2_gpu.py prepare --gguf SmolLM2.gguf --data alpaca_data_1k.json --out DIR
    python bench/smollm2_gpu.py run DIR [--budget 500]      # on the GPU (bench/smollm2_gpu.sh)
    python bench/smollm2_gpu.py run DIR --tiny              # the same commands, tiny, on a CPU

`prepare` (on any machine) puts in DIR what the GPU machine lacks: the data and SmolLM2's
tokenizer and chat template (a few MB; the 98 MB GGUF is over what a call may carry). `run`
then trains on a SmolLM2-shaped checkpoint of random weights with that tokenizer, unless DIR
holds the GGUF itself: the same tokens, batches, shapes and steps as the real run, so the same
time per step; what random weights change is the sample at each evaluation (48 new tokens, as
a model that never says its end token) and the load (our safetensors instead of dequantising
Q4_1: see `load_s` of the real file, measured separately). Losses of random weights mean nothing.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = "bench/alpaca_1k_smollm2_lengths.json"
README_RUN = ["--batch-size", "8", "--grad-accum", "4", "--epochs", "3", "--lr", "5e-4",
              "--warmup-steps", "10", "--eval-every", "30"]
# flags --tiny drops from the commands it runs on the CPU (and --compile-mode with its value)
GPU_ONLY = ("--cuda-graphs", "--compile", "--compile-dynamic")


def emit(record: dict):
    print(json.dumps(record), flush=True)


def prepare(a):
    sys.path.insert(0, str(ROOT))
    from tokenizer import checkpoint_tokenizer
    out = Path(a.out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint_tokenizer(a.gguf).save(out / "tokenizer")
    shutil.copy(a.data, out / "alpaca_data_1k.json")
    print(f"{out}: tokenizer and data ({time.perf_counter() - started:.1f} s)")


class Runner:
    def __init__(self, a):
        self.a = a
        self.deadline = time.monotonic() + a.budget
        self.work = Path(tempfile.mkdtemp(prefix="smollm2_gpu_"))
        self.python = sys.executable

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def launch(self, name: str, argv: list, cap: float, env: dict | None = None,
               minimum: float = 25) -> tuple[list, float] | None:
        """Run `python argv...` from the root: its output lines with the second each appeared,
        and its wall time; None (and a JSON line saying why) when skipped, failed or too slow."""
        if self.a.tiny:  # the GPU's flags are checked by the parse (check_flags), not run
            argv = [x for i, x in enumerate(argv) if x not in GPU_ONLY
                    and not (i and argv[i - 1] == "--compile-mode") and x != "--compile-mode"]
        timeout = min(cap * (5 if self.a.tiny else 1), self.left())  # (a busy CPU is slow)
        if timeout < minimum:
            emit({"variant": name, "skipped": f"{self.left():.0f} s of the budget left"})
            return None
        lines = []
        started = time.monotonic()
        proc = subprocess.Popen([self.python, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})

        def read():
            for line in proc.stdout:
                lines.append((round(time.monotonic() - started, 2), line.rstrip()))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        wall = round(time.monotonic() - started, 2)
        if proc.returncode != 0:
            tail = [text for _, text in lines[-15:]]
            why = f"timed out after {timeout:.0f} s" if proc.returncode < 0 else \
                f"exit {proc.returncode}"
            emit({"variant": name, "error": why, "wall_s": wall, "tail": tail})
            return None
        return lines, wall

    def json_line(self, name: str, argv: list, cap: float, env=None, **fields):
        """A benchmark script's JSON line, with the variant's name and the process's wall time."""
        result = self.launch(name, argv, cap, env)
        if result is None:
            return
        lines, wall = result
        found = [text for _, text in lines if text.startswith("{")]
        if not found:
            emit({"variant": name, "error": "no JSON line", "tail": [t for _, t in lines[-10:]]})
            return
        emit({"variant": name, "process_wall_s": wall, **fields, **json.loads(found[-1])})

    def train_run(self, name: str, folder: str, checkpoint: Path, data: Path, flags: list,
                  cap: float):
        """train_sft.py with the README's flags: the whole command's wall time, from its metrics
        the held-out losses and tokens/s, and when each line of its output appeared."""
        out = self.work / folder
        cache = self.work / f"cache_{folder}"  # a fresh compile cache: a first run's cost
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
        argv = ["train_sft.py", "--checkpoint", str(checkpoint), "--data", str(data),
                *README_RUN, "--out", str(out), *flags]
        if self.a.tiny:
            argv += ["--device", "cpu", "--max-steps", "1"]
        result = self.launch(name, argv, cap, env, minimum=40)
        if result is None:
            return
        lines, wall = result
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val_loss" in r]
        speeds = sorted(r["tokens_per_s"] for r in steps)
        emit({"variant": name, "flags": " ".join(flags) or "(none: the defaults)",
              "wall_s": wall, "steps": len(steps),
              "tokens_per_s_median": speeds[len(speeds) // 2],
              "val_loss": [round(r["val_loss"], 4) for r in evals],
              "peak_mem_gib": max((r["peak_mem_gib"] or 0) for r in steps),
              "timeline": [[t, text[:90]] for t, text in lines
                           if not text.startswith(("  sample", "{"))][:60]})


def environment() -> dict:
    import torch
    fields = {"variant": "environment", "torch": torch.__version__}
    if torch.cuda.is_available():
        fields["gpu"] = torch.cuda.get_device_name()
    for package in ("transformers", "peft", "liger_kernel", "triton"):
        try:
            module = __import__(package)
            fields[package] = getattr(module, "__version__", "present")
        except ImportError:
            fields[package] = None
    return fields


def loading_costs(tiny: bool) -> dict:
    """What loading the real GGUF costs on this machine's CPU, without the file: building the
    model's skeleton on the meta device (load_checkpoint does first), and dequantising Q4_1 blocks
    of SmolLM2's 134.5M weights (random bytes: the same work as the file's)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from formats.gguf_file import dequantize_q4_1
    from model import ModelConfig, Transformer
    started = time.perf_counter()
    with torch.device("meta"):
        Transformer(ModelConfig.from_name("tiny" if tiny else "smollm2-135m"))
    meta_s = time.perf_counter() - started
    blocks = torch.randint(0, 256, ((134_515_008 if not tiny else 1 << 20) // 32, 20),
                           dtype=torch.uint8)
    blocks[:, 1] = blocks[:, 3] = 0x3C  # fp16 scale and minimum of about 1: finite weights
    started = time.perf_counter()
    dequantize_q4_1(blocks)
    return {"variant": "loading costs", "meta_skeleton_s": round(meta_s, 2),
            "q4_1_dequantize_134.5M_weights_cpu_s": round(time.perf_counter() - started, 2),
            "cpu_threads": torch.get_num_threads()}


def smollm2_checkpoint(carry: Path, work: Path, tiny: bool) -> Path:
    """The GGUF if the carried folder holds it; else SmolLM2's shape, random weights (bf16), with
    the carried tokenizer beside it (--tiny: a 2-layer, 64-wide model with the same vocabulary)."""
    ggufs = sorted(carry.glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    sys.path.insert(0, str(ROOT))
    import torch
    from formats.checkpoint import save_checkpoint
    from model import PRESETS, ModelConfig, Transformer
    shape = dict(PRESETS["smollm2-135m"])
    if tiny:
        shape.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172)
    model = Transformer(ModelConfig(**shape))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    directory = work / "smollm2-135m-random"
    save_checkpoint(model.to(torch.bfloat16), directory)
    for file in (carry / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)
    return directory


def check_flags(commands: list):
    """--tiny: every command's flags through its own parser, GPU flags included (they are not
    run on the CPU), so that a typo fails here and not on the GPU."""
    sys.path.insert(0, str(ROOT))
    import config
    from bench import bench
    from errors import UserError
    for argv in commands:
        try:
            if argv[0] == "train_sft.py":
                config.parse_args(argv[1:] + ["--device", "cpu"])
            else:
                bench.parse_args(argv[2:])
        except UserError as e:
            if not str(e).startswith("--cuda-graphs needs a GPU"):
                raise


def run(a):
    carry = Path(a.carry).resolve()
    runner = Runner(a)
    emit(environment())
    try:
        emit(loading_costs(a.tiny))
    except (RuntimeError, ValueError, ImportError) as e:
        emit({"variant": "loading costs", "error": repr(e)})
    tiny = a.tiny
    device = "cpu" if tiny else "cuda"
    shape = "tiny" if tiny else "smollm2-135m"
    # each timed step: 4 micro-batches of 8 examples, as the README's run
    ours = ["-m", "bench", "--shape", shape, "--method", "lora", "--device", device,
            "--batch-size", "2" if tiny else "8", "--grad-accum", "1" if tiny else "4",
            "--lengths", LENGTHS]
    peer = ["bench/peer_hf_peft.py", "--shape", shape, "--method", "lora", "--device", device,
            "--batch-size", "2" if tiny else "8", "--grad-accum", "1" if tiny else "4",
            "--lengths", LENGTHS]

    def steps(n, warmup=1):
        return ["--steps", "1" if tiny else str(n), "--warmup", "0" if tiny else str(warmup)]

    graphs = ["--cuda-graphs", "--pad-to-multiple-of", "64"]
    compiled = ["--compile"]
    try:
        checkpoint = smollm2_checkpoint(carry, runner.work, tiny)
    except (OSError, RuntimeError) as e:  # the train_sft.py runs are left out, not the rest
        emit({"variant": "checkpoint", "error": repr(e)})
        checkpoint = None
    data = carry / "alpaca_data_1k.json"
    liger = {"PYTHONPATH": a.liger_path} if a.liger_path else {}
    plan = [  # (kind, name, argv or flags, cap in seconds): most important first
        ("ours", "ours: CUDA graphs, widths of 64 (the default of a short run)",
         graphs + steps(30), 90),
        ("peer", "peer: HF+PEFT, group_by_length", ["--group-by-length"] + steps(15, 2), 90),
        ("peer+liger", "peer: HF+PEFT+Liger, group_by_length",
         ["--group-by-length", "--liger"] + steps(15, 2), 90),
        ("train", "train_sft: the defaults", [], 120),
        ("train", "train_sft: --no-compile --no-cuda-graphs (the old default)",
         ["--no-compile", "--no-cuda-graphs"], 170),
        ("ours", "ours: compile + CUDA graphs, widths of 64 (the default of a long run)",
         compiled + graphs + steps(30), 150),
        ("ours", "ours: compile dynamic from the start + CUDA graphs, widths of 64",
         compiled + ["--compile-dynamic"] + graphs + steps(30), 150),
        ("ours", "ours: eager (the old default)", steps(8), 60),
        ("train", "train_sft: --compile (compiled although the run is short)", ["--compile"],
         150),
        ("ours", "ours: CUDA graphs, widths of 32", ["--cuda-graphs", "--pad-to-multiple-of",
                                                     "32"] + steps(30), 90),
        ("ours", "ours: compile + packing (the old best)", compiled + ["--packing"] + steps(8, 3),
         120),
        ("ours", "ours: compile + CUDA graphs + packing", compiled + graphs + ["--packing"]
         + steps(8), 120),
        ("ours", "ours: compile reduce-overhead, widths of 64",
         compiled + ["--compile-mode", "reduce-overhead", "--pad-to-multiple-of", "64"]
         + steps(30), 150),
        ("peer", "peer: HF+PEFT, random order (the Trainer's default)", steps(15, 2), 90),
    ]
    if tiny:
        check_flags([ours + argv for kind, _, argv, _ in plan if kind == "ours"]
                    + [["train_sft.py", "--checkpoint", "x.gguf", "--data", "x.json", *README_RUN,
                        *flags] for kind, _, flags, _ in plan if kind == "train"])
    for number, (kind, name, argv, cap) in enumerate(plan):
        if a.only and number not in a.only:
            continue
        if kind == "ours":
            runner.json_line(name, ours + argv, cap)
        elif kind == "peer" or (kind == "peer+liger" and not tiny):
            runner.json_line(name, peer + argv, cap, env=liger if kind == "peer+liger" else None)
        elif kind == "train" and checkpoint:  # each with a cold compile cache
            runner.train_run(name, f"run{number}", checkpoint, data, argv, cap)
    emit({"variant": "done", "budget_left_s": round(runner.left())})
    shutil.rmtree(runner.work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="write the carried folder (tokenizer, data)")
    pre.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct's GGUF")
    pre.add_argument("--data", required=True, help="alpaca_data_1k.json")
    pre.add_argument("--out", required=True, help="the folder to carry (gpu_carry)")
    go = sub.add_parser("run", help="measure")
    go.add_argument("carry", help="the folder `prepare` wrote")
    go.add_argument("--budget", type=float, default=500, help="seconds for everything")
    go.add_argument("--tiny", action="store_true", help="a CPU check of every command")
    go.add_argument("--liger-path", help="PYTHONPATH for the peer's Liger run")
    go.add_argument("--only", type=lambda text: [int(n) for n in text.split(",")],
                    help="only these measurements, by their number in the plan (0, 1, ...)")
    a = p.parse_args()
    prepare(a) if a.command == "prepare" else run(a)


if __name__ == "__main__":
    main()
