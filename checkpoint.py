"""Reading and writing model weights: Hugging Face's format and this project's own.

    directory with config.json + *.safetensors / pytorch_model*.bin   Hugging Face (here)
    directory with model_config.json + model.safetensors              this project's own (here)
    directory with params.json + consolidated.*.pth                   Meta's original (formats.py)
    *.bin with a 7-int header / *.pt with model_args                  llama2.c (formats.py)
    *.gguf (f32/f16/bf16 or quantised)                                llama.cpp (gguf_file.py)

Each reader returns (config, tensors): tensors yields (name in the file, our name, tensor)
lazily. `load_checkpoint` checks every shape against the config and moves tensors one at a time
into a model built on the "meta" device (no memory), so a 7B model never needs two copies in RAM.
"""
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from errors import UserError, disk_full_cause
from model import ModelConfig, Transformer
from projections import is_target, replace_module
from quant import DEFAULT_TARGETS as QUANTIZED_LAYERS, NF4Linear


def load_checkpoint(path, device="cpu", dtype=torch.float32, quantize: bool = False):
    """Read any supported checkpoint into a `Transformer` on `device` in `dtype`: (model, config).

    quantize=True (QLoRA) stores the seven projections of every block in NF4 as they are read,
    one matrix at a time, so the 16-bit model never exists in full on the device."""
    config, tensors = read_checkpoint(path)
    quantized = {}  # module name -> NF4Linear
    with torch.device("meta"):  # parameters without memory; real tensors are assigned below
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    state = {}
    unexpected = []  # names in the file
    for file_name, name, t in tensors:
        if name not in expected:
            if not _unneeded(name, config):
                unexpected.append(file_name)
            continue
        if tuple(t.shape) != expected[name]:
            raise UserError(f"{path}: tensor {file_name} has shape {tuple(t.shape)}, but the "
                            f"config expects {expected[name]}")
        module_name = name.removesuffix(".weight")
        t = t.to(device=device, dtype=dtype)  # one tensor at a time
        if quantize and is_target(module_name, QUANTIZED_LAYERS):
            quantized[module_name] = NF4Linear.from_weight(t, compute_dtype=dtype)
        else:
            state[name] = t
    missing = sorted(set(expected) - set(state) - {f"{n}.weight" for n in quantized})
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match its config: "
                        + _mismatch(missing, unexpected))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    for module_name, layer in quantized.items():
        replace_module(model, module_name, layer)
    model.load_state_dict(state, assign=True, strict=not quantized)  # (NF4 buffers were set above)
    if config.tie_embeddings:  # assign replaced the Parameter objects: share them again
        model.tie_head()
    return model, config


def _unneeded(name: str, config: ModelConfig) -> bool:
    """A tensor some files carry that the model does not take (not an error): a RoPE buffer
    (Hugging Face's old `...rotary_emb.inv_freq`, Meta's `rope.freqs`; we compute RoPE from the
    config), or a tied model's head stored as a copy of the embedding."""
    if config.tie_embeddings and name == "lm_head.weight":
        return True
    return "rotary_emb" in name or name == "rope.freqs"


def _mismatch(missing: list, unexpected: list) -> str:
    """'missing 2 tensors (a, b); unexpected 1 tensors (c)', at most five names of each."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors ({_first_names(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensors ({_first_names(unexpected)})")
    return "; ".join(parts)


def _first_names(names: list) -> str:
    if len(names) > 5:
        return ", ".join(names[:5]) + ", ..."
    return ", ".join(names)


def read_checkpoint(path):
    """Detect the format from what is on disk: (config, iterator of (file name, our name,
    tensor))."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "config.json").exists():
        return read_hf(path)
    if path.is_dir() and (path / "model_config.json").exists():
        return read_own(path)
    # The other formats live in their own modules, imported only for a checkpoint in one of them.
    import formats
    import gguf_file

    if path.is_dir() and (path / "params.json").exists():
        return formats.read_meta(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        if f.suffix == ".pt":
            return formats.read_llama2c_pt(f)
        if f.suffix == ".gguf":
            return gguf_file.read_gguf(f)
        if f.suffix == ".bin":
            config = formats.llama2c_bin_config(f)
            if config:
                return formats.read_llama2c_bin(f, config)
        if f.suffix == ".safetensors" and (f.parent / "config.json").exists():
            return read_hf(f.parent)
    raise UserError(f"{path}: no checkpoint found. Expected a Hugging Face directory (config.json "
                    "+ model*.safetensors or pytorch_model*.bin), a Meta directory (params.json + "
                    "consolidated.*.pth), a llama2.c model (.bin with its 7-int header, or .pt), a "
                    ".gguf file, or this project's model_config.json + model.safetensors")


# ---------------------------------------------------------------- Hugging Face

HF_NAMES = {  # ours: Hugging Face's
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
HF_LAYER_PREFIX = "model.layers.{}."
HF_LAYER_NAMES = {  # ours: Hugging Face's, within one block
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
}
# The keys of config.json that hold sizes: each must be a whole number >= 1 where given.
HF_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


def read_hf(d: Path):
    """config.json and the weights: one file, or the shards an index lists. q/k rows are put
    back in Meta's order (hf_permute) as they are read."""
    config = config_from_hf(read_json(d / "config.json"), d / "config.json")
    names = hf_names(config.n_layers)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index_name).exists():
            files = sorted({d / f for f in read_json(d / index_name)["weight_map"].values()})
            break
    else:
        files = [f for f in (d / "model.safetensors", d / "pytorch_model.bin") if f.exists()]
    if not files:
        raise UserError(f"{d}: config.json but no weights (expected model.safetensors, "
                        "model.safetensors.index.json with shards, or pytorch_model.bin)")
    if files[0].suffix == ".safetensors":
        items = _read_safetensors(files)
    else:
        items = (kv for f in files for kv in read_torch_file(f).items())

    def tensors():
        for key, t in items:
            ours = names.get(key, key)
            if ours.endswith(("q_proj.weight", "k_proj.weight")) and t.dim() == 2:
                n = config.n_heads if "q_proj" in ours else config.n_kv_heads
                # (a wrong shape is reported by load_checkpoint, not here)
                if t.shape[0] == n * config.head_dim:
                    t = hf_permute(t, n, to_hf=False)
            yield key, ours, t
    return config, tensors()


def config_from_hf(c: dict, path="config.json") -> ModelConfig:
    """From a Hugging Face `config.json` of a LlamaForCausalLM (transformers 4 or 5 spelling);
    `path` names the file in error messages."""
    for key in HF_SIZE_KEYS:
        value = c.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{path}: {key} is {value!r}, but it must be a whole number >= 1")
    # transformers 5 merged rope_theta and rope_scaling into rope_parameters
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"rope type {kind!r} is not supported (only the default and 'llama3')")
    try:
        scaling = None
        if kind == "llama3":
            scaling = {k: rope[k] for k in LLAMA3_ROPE_KEYS}
        return ModelConfig(dim=c["hidden_size"],
                           n_layers=c["num_hidden_layers"],
                           n_heads=c["num_attention_heads"],
                           n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                           ffn_hidden=c["intermediate_size"],
                           vocab_size=c["vocab_size"],
                           norm_eps=c.get("rms_norm_eps", 1e-6),
                           rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
                           rope_scaling=scaling,
                           max_seq_len=c.get("max_position_embeddings", 4096),
                           tie_embeddings=c.get("tie_word_embeddings", False),
                           head_dim=c.get("head_dim"))
    except KeyError as e:
        raise UserError(f"{path}: not a Llama model config (no {e} entry)") from None


def config_to_hf(config: ModelConfig) -> dict:
    """The `config.json` transformers needs to load this model as LlamaForCausalLM."""
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "hidden_size": config.dim,
         "num_hidden_layers": config.n_layers,
         "num_attention_heads": config.n_heads,
         "num_key_value_heads": config.n_kv_heads,
         "intermediate_size": config.ffn_hidden,
         "vocab_size": config.vocab_size,
         "rms_norm_eps": config.norm_eps,
         "rope_theta": config.rope_theta,
         "max_position_embeddings": config.max_seq_len,
         "tie_word_embeddings": config.tie_embeddings,
         "head_dim": config.head_dim,
         "attention_bias": False, "mlp_bias": False}
    if config.rope_scaling:
        c["rope_scaling"] = {"rope_type": "llama3", **config.rope_scaling}
    return c


def hf_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Hugging Face's RoPE rotates the two *halves* of each head ("rotate_half"); Meta's rotates
    adjacent *pairs*. HF's converter therefore reorders the rows of q_proj and k_proj within each
    head, pairs (0,1),(2,3),... → evens first then odds, which makes the two rotations agree. We
    keep Meta's order, so HF weights are put back on load and reordered again on export, here
    only."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    if to_hf:
        return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def hf_names(n_layers: int) -> dict:
    """{Hugging Face's name: our name} for every tensor of an n_layers model."""
    return name_map(HF_NAMES, HF_LAYER_NAMES, HF_LAYER_PREFIX, n_layers)


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


# ---------------------------------------------------------------- this project's own format

def read_own(d: Path):
    """model_config.json (our ModelConfig's fields) + model.safetensors under our names."""
    config = ModelConfig(**read_json(d / "model_config.json"))
    return config, ((k, k, t) for k, t in _read_safetensors([d / "model.safetensors"]))


def save_checkpoint(model: Transformer, directory):
    """This project's own format: model.safetensors under our names + model_config.json."""
    directory = Path(directory)
    save_safetensors(_model_tensors(model), directory / "model.safetensors")
    write_json(directory / "model_config.json", asdict(model.config))


def _model_tensors(model: Transformer) -> dict:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")  # the same matrix as the embedding; safetensors stores it once
    return sd


# ---------------------------------------------------------------- writers

def save_hf_checkpoint(model: Transformer, directory, dtype=None):
    """A Hugging Face LlamaForCausalLM directory (config.json + model.safetensors), q/k permuted
    back."""
    directory = Path(directory)
    c = model.config
    to_hf = {ours: theirs for theirs, ours in hf_names(c.n_layers).items()}
    tensors = {}
    for name, t in _model_tensors(model).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = c.n_heads if "q_proj" in name else c.n_kv_heads
            t = hf_permute(t, n, to_hf=True)
        tensors[to_hf[name]] = t.to(dtype) if dtype else t
    save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    stored_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(directory / "config.json", {**config_to_hf(c), "torch_dtype": stored_dtype})


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

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


def read_torch_file(path: Path) -> dict:
    """A file written by torch.save, read without running code from it (weights_only: a
    checkpoint is untrusted input) and without a RAM copy (mmap)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint "
                        f"({type(e).__name__}: {e})") from None


def _read_safetensors(files):
    """(name, tensor) of every tensor of the files, one at a time."""
    from safetensors import SafetensorError, safe_open
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # (its own type too)
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
