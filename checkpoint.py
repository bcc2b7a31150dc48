"""Reading and writing model weights in the formats LLaMA checkpoints come in.

    directory with config.json + *.safetensors / pytorch_model*.bin   Hugging Face
    directory with params.json + consolidated.*.pth                   Meta's original release
    *.bin with a 7-int header / *.pt with model_args                  llama2.c
    *.gguf (f32/f16/bf16 or quantised, read by gguf_file.py)          llama.cpp
    directory with model_config.json + model.safetensors              this project's own

Each reader yields (name in the file, our name, tensor) lazily; `load_checkpoint` checks every
shape against the config and moves tensors one at a time into a model built on the "meta"
device (no memory), so a 7B model never needs two copies in RAM.
"""
import json
import os
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from errors import UserError, disk_full_cause
from gguf_file import read_gguf  # llama.cpp's GGUF, quantised or not, lives in its own module
from model import ModelConfig, Transformer
from quant import DEFAULT_TARGETS as QUANTIZED_LAYERS, NF4Linear, replace_module

# Our name for each tensor, as each format spells it. Per-layer names sit under a layer prefix.
TOP_NAMES = {  # ours: (hf, meta, gguf)
    "embed_tokens.weight": ("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "norm.weight", "output_norm.weight"),
    "lm_head.weight": ("lm_head.weight", "output.weight", "output.weight"),
}
LAYER_NAMES = {
    "attn_norm.weight": ("input_layernorm.weight", "attention_norm.weight", "attn_norm.weight"),
    "attn.q_proj.weight": ("self_attn.q_proj.weight", "attention.wq.weight", "attn_q.weight"),
    "attn.k_proj.weight": ("self_attn.k_proj.weight", "attention.wk.weight", "attn_k.weight"),
    "attn.v_proj.weight": ("self_attn.v_proj.weight", "attention.wv.weight", "attn_v.weight"),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", "attention.wo.weight", "attn_output.weight"),
    "mlp_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight", "ffn_norm.weight"),
    "mlp.gate_proj.weight": ("mlp.gate_proj.weight", "feed_forward.w1.weight", "ffn_gate.weight"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", "feed_forward.w2.weight", "ffn_down.weight"),
    "mlp.up_proj.weight": ("mlp.up_proj.weight", "feed_forward.w3.weight", "ffn_up.weight"),
}
LAYER_PREFIX = ("model.layers.{}.", "layers.{}.", "blk.{}.")
FORMATS = ("hf", "meta", "gguf")


def name_map(fmt: str, n_layers: int) -> dict:
    """{name in format `fmt`: our name} for every tensor of an n_layers model."""
    i = FORMATS.index(fmt)
    names = {theirs[i]: ours for ours, theirs in TOP_NAMES.items()}
    for layer in range(n_layers):
        for ours, theirs in LAYER_NAMES.items():
            names[LAYER_PREFIX[i].format(layer) + theirs[i]] = f"layers.{layer}.{ours}"
    return names


def hf_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Hugging Face's RoPE rotates the two *halves* of each head ("rotate_half"); Meta's rotates
    adjacent *pairs*. HF's converter therefore reorders the rows of q_proj and k_proj within each
    head, pairs (0,1),(2,3),… → evens first then odds, which makes the two rotations agree. We keep
    Meta's order, so HF weights are put back on load and reordered again on export, here only."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    if to_hf:
        return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------- readers: path -> (config, tensors)

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


def _safetensors(files):
    from safetensors import SafetensorError, safe_open
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # safetensors raises its own error types too
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None


def _torch_load(path: Path) -> dict:
    try:  # weights_only: a checkpoint is untrusted input and must not run code; mmap: no RAM copy
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_hf(d: Path):
    try:
        config = ModelConfig.from_hf(_read_json(d / "config.json"))
    except KeyError as e:
        raise UserError(f"{d / 'config.json'}: not a Llama model config (no {e} entry)") from None
    names = name_map("hf", config.n_layers)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index_name).exists():
            files = sorted({d / f for f in _read_json(d / index_name)["weight_map"].values()})
            break
    else:
        files = [f for f in (d / "model.safetensors", d / "pytorch_model.bin") if f.exists()]
    if not files:
        raise UserError(f"{d}: config.json but no weights (expected model.safetensors, "
                        "model.safetensors.index.json with shards, or pytorch_model.bin)")
    if files[0].suffix == ".safetensors":
        items = _safetensors(files)
    else:
        items = (kv for f in files for kv in _torch_load(f).items())

    def tensors():
        for key, t in items:
            ours = names.get(key, key)
            if ours.endswith(("q_proj.weight", "k_proj.weight")) and t.dim() == 2:
                n = config.n_heads if "q_proj" in ours else config.n_kv_heads
                if t.shape[0] == n * config.head_dim:  # a wrong shape is reported by load_checkpoint
                    t = hf_permute(t, n, to_hf=False)
            yield key, ours, t
    return config, tensors()


def read_meta(d: Path):
    shards = sorted(d.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{d}: params.json but no consolidated.*.pth weights")
    params = _read_json(d / "params.json")
    loaded = [_torch_load(f) for f in shards]
    config = ModelConfig.from_meta(params, vocab_size=loaded[0]["tok_embeddings.weight"].shape[0])
    config.tie_embeddings = "output.weight" not in loaded[0]  # Llama-3.2 1B/3B ship no separate head
    names = name_map("meta", config.n_layers)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}

    def tensors():
        for key in loaded[0]:
            ours = names.get(key, key)
            parts = [sd[key] for sd in loaded]
            if len(parts) > 1 and ours in expected:
                # Model-parallel shards split each matrix along the dimension its layer is parallel
                # in (rows for wq/w1, columns for wo/w2, and either for the embedding); norms are
                # copied whole. Concatenate along the one axis whose size does not match yet.
                axis = [a for a in range(parts[0].dim()) if parts[0].shape[a] != expected[ours][a]]
                parts = [torch.cat(parts, dim=axis[0])] if axis else parts[:1]
            yield key, ours, parts[0]
    return config, tensors()


def read_llama2c_pt(path: Path):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not a llama2.c training checkpoint (expected keys 'model' and 'model_args')")
    a, state = ckpt["model_args"], {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    config = ModelConfig(dim=a["dim"], n_layers=a["n_layers"], n_heads=a["n_heads"],
                         n_kv_heads=a.get("n_kv_heads") or a["n_heads"], vocab_size=a["vocab_size"],
                         ffn_hidden=state["layers.0.feed_forward.w1.weight"].shape[0],
                         norm_eps=a.get("norm_eps", 1e-5), max_seq_len=a.get("max_seq_len", 2048),
                         tie_embeddings=True)  # llama2.c always ties the classifier to the embedding
    names = name_map("meta", config.n_layers)
    return config, ((k, names.get(k, k), v) for k, v in state.items() if k != "output.weight")


def llama2c_bin_config(path: Path):
    """The config of a legacy llama2.c `.bin` export, or None if the file is not one: 7 int32
    (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then float32 tensors.
    A negative vocab_size means the file has its own classifier matrix at the end."""
    size = path.stat().st_size
    if size < 28:
        return None
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", f.read(28))
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or dim % n_heads:
        return None
    config = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, ffn_hidden=hidden,
                         vocab_size=abs(vocab), max_seq_len=seq_len, tie_embeddings=vocab > 0)
    return config if size == 28 + 4 * _llama2c_floats(config) else None


def _llama2c_layout(c: ModelConfig):
    hd, kv, L = c.head_dim, c.n_kv_heads * c.head_dim, c.n_layers
    layout = [("embed_tokens.weight", (c.vocab_size, c.dim)), ("attn_norm.weight", (L, c.dim)),
              ("attn.q_proj.weight", (L, c.dim, c.dim)), ("attn.k_proj.weight", (L, kv, c.dim)),
              ("attn.v_proj.weight", (L, kv, c.dim)), ("attn.o_proj.weight", (L, c.dim, c.dim)),
              ("mlp_norm.weight", (L, c.dim)), ("mlp.gate_proj.weight", (L, c.ffn_hidden, c.dim)),
              ("mlp.down_proj.weight", (L, c.dim, c.ffn_hidden)), ("mlp.up_proj.weight", (L, c.ffn_hidden, c.dim)),
              ("norm.weight", (c.dim,)), ("freq_cis_real", (c.max_seq_len, hd // 2)),
              ("freq_cis_imag", (c.max_seq_len, hd // 2))]
    return layout + ([] if c.tie_embeddings else [("lm_head.weight", (c.vocab_size, c.dim))])


def _llama2c_floats(c: ModelConfig) -> int:
    return sum(int(np.prod(shape)) for _, shape in _llama2c_layout(c))


def read_llama2c_bin(path: Path, config: ModelConfig):
    data = np.memmap(path, dtype=np.float32, mode="c", offset=28)  # copy-on-write view, no RAM copy

    def tensors():
        offset = 0
        for name, shape in _llama2c_layout(config):
            n = int(np.prod(shape))
            t = torch.from_numpy(data[offset:offset + n].reshape(shape))
            offset += n
            if name.startswith("freq_cis"):
                continue  # RoPE tables: we compute them from the config
            if name in LAYER_NAMES:  # stored stacked over layers
                for layer in range(config.n_layers):
                    yield name, f"layers.{layer}.{name}", t[layer]
            else:
                yield name, name, t
    return config, tensors()


def read_checkpoint(path):
    """Detect the format from what is on disk; return (config, iterator of (file name, our name, tensor))."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file():
        d, files = path.parent, [path]
    else:
        d, files = path, sorted(p for p in path.iterdir() if p.is_file())
        if (d / "config.json").exists():
            return read_hf(d)
        if (d / "model_config.json").exists():
            return read_own(d)
        if (d / "params.json").exists():
            return read_meta(d)
    for f in files:
        if f.suffix == ".pt":
            return read_llama2c_pt(f)
        if f.suffix == ".gguf":
            return read_gguf(f)
        if f.suffix == ".bin" and (config := llama2c_bin_config(f)):
            return read_llama2c_bin(f, config)
        if f.suffix == ".safetensors" and (f.parent / "config.json").exists():
            return read_hf(f.parent)
    raise UserError(f"{path}: no checkpoint found. Expected a Hugging Face directory (config.json + model*.safetensors "
                    "or pytorch_model*.bin), a Meta directory (params.json + consolidated.*.pth), a llama2.c "
                    "model (.bin with its 7-int header, or .pt), a .gguf file, or this project's model_config.json + model.safetensors")


def load_checkpoint(path, device="cpu", dtype=torch.float32, quantize: bool = False):
    """Read any supported checkpoint into a `Transformer` on `device` in `dtype`: (model, config).

    quantize=True (QLoRA) stores the seven projections of every block in NF4 as they are read, one
    matrix at a time, so the 16-bit model never exists in full on the device."""
    config, tensors = read_checkpoint(path)
    quantized = {}  # module name -> NF4Linear
    with torch.device("meta"):  # parameters without memory; real tensors are assigned below
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    state, unexpected = {}, []
    for file_name, name, t in tensors:
        if name not in expected:
            if not (config.tie_embeddings and name == "lm_head.weight") and "rotary_emb" not in name and name != "rope.freqs":
                unexpected.append(file_name)
            continue
        if tuple(t.shape) != expected[name]:
            raise UserError(f"{path}: tensor {file_name} has shape {tuple(t.shape)}, but the config "
                            f"expects {expected[name]}")
        module_name = name.removesuffix(".weight")
        if quantize and module_name.endswith(QUANTIZED_LAYERS):
            quantized[module_name] = NF4Linear.from_weight(t.to(device=device, dtype=dtype), compute_dtype=dtype)
        else:
            state[name] = t.to(device=device, dtype=dtype)  # one tensor at a time
    missing = sorted(set(expected) - set(state) - {f"{n}.weight" for n in quantized})
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match its config: "
                        + (f"missing {len(missing)} tensors ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})" if missing else "")
                        + ("; " if missing and unexpected else "")
                        + (f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})" if unexpected else ""))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    for module_name, layer in quantized.items():
        replace_module(model, module_name, layer)
    model.load_state_dict(state, assign=True, strict=not quantized)  # (NF4 buffers were set above)
    if config.tie_embeddings:  # assign replaced the Parameter objects: share them again
        model.lm_head.weight = model.embed_tokens.weight
    return model, config


# ---------------------------------------------------------------- writers

def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash mid-write leaves the old file whole.
    (os.replace is atomic on POSIX when both paths are on one filesystem, hence the tmp beside it.)
    The tmp is named .NAME.XXXXXXXX.tmp; run_dir.py removes those a kill -9 leaves behind.
    A full disk is a UserError that says the previous file is kept; nothing else is caught."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it the usual mode
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


def _model_tensors(model: Transformer) -> dict:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")  # the same matrix as the embedding; safetensors stores it once
    return sd


def save_checkpoint(model: Transformer, directory):
    """This project's own format: model.safetensors under our names + model_config.json."""
    directory = Path(directory)
    save_safetensors(_model_tensors(model), directory / "model.safetensors")
    write_json(directory / "model_config.json", asdict(model.config))


def read_own(d: Path):
    config = ModelConfig(**_read_json(d / "model_config.json"))
    return config, ((k, k, t) for k, t in _safetensors([d / "model.safetensors"]))


def save_hf_checkpoint(model: Transformer, directory, dtype=None):
    """A Hugging Face LlamaForCausalLM directory (config.json + model.safetensors), q/k permuted back."""
    directory, c = Path(directory), model.config
    to_hf = {ours: theirs for theirs, ours in name_map("hf", c.n_layers).items()}
    tensors = {}
    for name, t in _model_tensors(model).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t = hf_permute(t, c.n_heads if "q_proj" in name else c.n_kv_heads, to_hf=True)
        tensors[to_hf[name]] = t.to(dtype) if dtype else t
    save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    write_json(directory / "config.json", {**c.to_hf(), "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")})
