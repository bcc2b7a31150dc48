"""The memory peak of `export.py --gguf` on a model of a public shape, measured.

    python -m bench.export_peak --shape llama-3-8b --tokenizer PATH/llama3/tokenizer.model \
        --work /a/disk/with/40GB               # 16 GB of checkpoint, 16 GB of f16 GGUF
    python -m bench.export_peak --shape tiny --work /tmp/peak \
        --tokenizer tests/fixtures/models/stories260K/tok512.model   # a smoke test, seconds

It writes a random checkpoint of that shape as Meta publishes Llama-3: a Hugging Face directory of
bf16 safetensors shards of about --shard-gb each, plus a random LoRA adapter (rank 16 on all seven
projections, B non-zero, so every projection is merged). Then it runs export.py on them in a child
process and reads the child's memory from /proc every 20 ms:

    rss    all its resident memory
    anon   the part that is its own (tensors, Python); the rest of rss is safetensors' memory-mapped
           shard pages, which the kernel may drop at any time, as it drops the page cache

One JSON line. The GGUF is deleted afterwards (--keep keeps it), the checkpoint is kept for reuse.
"""
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from errors import ArgumentParser, positive_int, run_cli
from formats.adapter import ADAPTER_CONFIG, ADAPTER_TENSORS
from formats.checkpoint import config_to_hf, hf_names
from formats.files import save_safetensors, write_json
from formats.gguf_write import FILE_TYPES
from lora import apply_lora, lora_settings, lora_state_dict
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(config: ModelConfig, directory: Path, shard_bytes: int):
    """config.json and bf16 shards of about shard_bytes each with their index, one shard in
    memory at a time. The q/k rows are random: Hugging Face's row order has nothing to undo."""
    names = {ours: hf for hf, ours in hf_names(config.n_layers).items()}
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in Transformer(config).state_dict().items()}
    shard, size, n_shards, weight_map = {}, 0, 0, {}
    for i, (ours, shape) in enumerate(shapes.items()):
        shard[names[ours]] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        size += shard[names[ours]].nbytes
        if size >= shard_bytes or i == len(shapes) - 1:
            n_shards += 1
            file = f"shard-{n_shards}.safetensors"
            save_safetensors(shard, directory / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            shard, size = {}, 0
    write_json(directory / "model.safetensors.index.json", {"weight_map": weight_map})
    write_json(directory / "config.json", config_to_hf(config))


def write_adapter(config: ModelConfig, directory: Path, r: int):
    """A LoRA adapter on all seven projections with random A and B (so every one is merged)."""
    with torch.device("meta"):  # names and shapes, no memory
        model = Transformer(config)
    apply_lora(model, "all", r=r, alpha=2 * r)
    tensors = {k: torch.randn(t.shape) * 0.01 for k, t in lora_state_dict(model).items()}
    save_safetensors(tensors, directory / ADAPTER_TENSORS, metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, {**lora_settings(model), "base": asdict(config)})


def peak_memory(argv: list) -> dict:
    """Run argv; its peak resident and anonymous memory (bytes, read from /proc), and seconds."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT)
    peak = {"rss": 0, "anon": 0}
    fields = {"VmRSS:": "rss", "RssAnon:": "anon"}

    def watch():
        while child.poll() is None:
            try:
                for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                    key, *value = line.split()
                    if key in fields:
                        peak[fields[key]] = max(peak[fields[key]], int(value[0]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    code = child.wait()
    watcher.join()
    if code != 0:
        raise SystemExit(f"error: {' '.join(argv)} exited with {code}")
    return {**peak, "seconds": time.perf_counter() - start}


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama-3-8b",
                   help="a public model shape (default: %(default)s)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer file export.py writes into "
                   "the GGUF, with the shape's vocabulary (required)")
    p.add_argument("--work", required=True, help="a directory for the checkpoint, the adapter and "
                   "the GGUF (created; a checkpoint already there is reused)")
    p.add_argument("--type", default="f16", choices=list(FILE_TYPES),
                   help="GGUF weight type (default: %(default)s)")
    p.add_argument("--rank", type=positive_int, default=16, help="adapter rank (default: 16)")
    p.add_argument("--shard-gb", type=float, default=5.0,
                   help="size of each checkpoint shard in GB (default: 5, as Meta's)")
    p.add_argument("--keep", action="store_true", help="keep the GGUF (default: delete it)")
    args = p.parse_args(argv)
    config = ModelConfig.from_name(args.shape)
    work = Path(args.work)
    checkpoint, adapter = work / "checkpoint", work / "adapter"
    if not (checkpoint / "config.json").is_file():
        checkpoint.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        print(f"writing a random {args.shape} checkpoint to {checkpoint}", file=sys.stderr)
        write_checkpoint(config, checkpoint, int(args.shard_gb * 1e9))
    if not (adapter / ADAPTER_CONFIG).is_file():
        adapter.mkdir(parents=True, exist_ok=True)
        write_adapter(config, adapter, args.rank)
    gguf = work / f"{args.shape}-{args.type}.gguf"
    peak = peak_memory([sys.executable, "export.py", str(checkpoint), "--adapter", str(adapter),
                        "--tokenizer", args.tokenizer, "--gguf", str(gguf), "--type", args.type,
                        "--force"])
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    result = {"shape": args.shape, "type": args.type, "rank": args.rank,
              "checkpoint_gib": round(checkpoint_bytes / 2**30, 3),
              "gguf_gib": round(gguf.stat().st_size / 2**30, 3),
              "peak_rss_gib": round(peak["rss"] / 2**30, 3),
              "peak_anon_gib": round(peak["anon"] / 2**30, 3),
              "seconds": round(peak["seconds"], 1), "cpus": os.cpu_count()}
    if not args.keep:
        gguf.unlink()
        gguf.with_suffix(".Modelfile").unlink(missing_ok=True)
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
