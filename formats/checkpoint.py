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
import re
from dataclasses import asdict, fields as dataclass_fields
from pathlib import Path

import torch

from errors import UserError
from formats.files import (OBJECT, REQUIRED, _count_safetensors, _read_safetensors,
                           check_layer_count, config_value, model_config, name_map, read_json,
                           read_state_dict, save_safetensors, write_json)
from model import FLAG, LLAMA3_SCALING_RULES, POSITIVE, SIZE, ModelConfig, Transformer
from projections import is_target, replace_module
from speed.quant import DEFAULT_TARGETS as QUANTIZED_LAYERS, NF4Linear


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
    path = existing_checkpoint(path)
    if path.is_dir() and (path / "config.json").exists():
        return read_hf(path)
    if path.is_dir() and (path / "model_config.json").exists():
        return read_own(path)
    # The other formats live in their own modules, imported only for a checkpoint in one of them.
    from formats import meta_llama2c
    from formats import gguf_file

    if path.is_dir() and (path / "params.json").exists():
        return meta_llama2c.read_meta(path)
    f = single_file_checkpoint(path)
    if f is not None and f.suffix == ".pt":
        return meta_llama2c.read_llama2c_pt(f)
    if f is not None and f.suffix == ".gguf":
        return gguf_file.read_gguf(f)
    if f is not None:
        return meta_llama2c.read_llama2c_bin(f, meta_llama2c.llama2c_bin_config(f))
    if path.suffix == ".safetensors" and (path.parent / "config.json").exists():
        return read_hf(path.parent)
    raise UserError(f"{path}: no checkpoint found. Expected a Hugging Face directory (config.json "
                    "+ model*.safetensors or pytorch_model*.bin), a Meta directory (params.json + "
                    "consolidated.*.pth), a llama2.c model (.bin with its 7-int header, or .pt), a "
                    ".gguf file, or this project's model_config.json + model.safetensors")


def single_file_checkpoint(path: Path) -> Path | None:
    """The file a one-file checkpoint is read from: `path` itself, or the first file of the
    folder `path` (by name) that is a .pt, a .gguf or a llama2.c .bin; None if there is none."""
    from formats import meta_llama2c
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        llama2c_bin = f.suffix == ".bin" and meta_llama2c.llama2c_bin_config(f)
        if f.suffix in (".pt", ".gguf") or llama2c_bin:
            return f
    return None


# What a name on the Hugging Face Hub looks like: owner/name, no file suffix of a model file.
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
MODEL_SUFFIXES = (".gguf", ".bin", ".pt", ".pth", ".safetensors", ".json", ".model")


def existing_checkpoint(path) -> Path:
    """`path` as a Path if it exists; else a UserError that says so, and what to do when it
    looks like a Hugging Face Hub name (nothing is downloaded here)."""
    path = Path(path)
    if path.exists():
        return path
    text = str(path)
    if HUB_NAME.fullmatch(text) and not text.endswith(MODEL_SUFFIXES):
        raise UserError(f"checkpoint not found: {path}. If it is a Hugging Face Hub name: this "
                        "project reads only files on this machine and downloads nothing; "
                        f"download it first (huggingface-cli download {path} --local-dir DIR, or "
                        f"git clone https://huggingface.co/{path} DIR) and pass that folder")
    raise UserError(f"checkpoint not found: {path}")


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
def read_hf(d: Path):
    """config.json and the weights: one file, or the shards an index lists. q/k rows are put
    back in Meta's order (hf_permute) as they are read."""
    config = config_from_hf(read_json(d / "config.json"), d / "config.json")
    files = _hf_weight_files(d)
    if files[0].suffix == ".safetensors":
        check_layer_count(d, config, _count_safetensors(files))
        items = _read_safetensors(files)
    else:
        loaded = [read_state_dict(f) for f in files]  # (memory-mapped: no RAM copy)
        check_layer_count(d, config, sum(len(state) for state in loaded))
        items = (kv for state in loaded for kv in state.items())
    names = hf_names(config.n_layers)

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


def _hf_weight_files(d: Path) -> list:
    """The weight files of a Hugging Face directory: the shards its index lists, else the one
    file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = d / index_name
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(f, str) for f in weight_map.values()):
                raise UserError(f"{index_path}: no \"weight_map\" object of tensor name → "
                                "shard file name")
            return sorted({d / f for f in weight_map.values()})
    files = [f for f in (d / "model.safetensors", d / "pytorch_model.bin") if f.exists()]
    if not files:
        raise UserError(f"{d}: config.json but no weights (expected model.safetensors, "
                        "model.safetensors.index.json with shards, or pytorch_model.bin)")
    return files


def config_from_hf(c: dict, path="config.json") -> ModelConfig:
    """From a Hugging Face `config.json` of a LlamaForCausalLM (transformers 4 or 5 spelling);
    `path` names the file in error messages."""
    def value(key, rule, default=REQUIRED, values=c):
        return config_value(values, key, path, rule, default)
    # transformers 5 merged rope_theta and rope_scaling into rope_parameters
    rope = value("rope_parameters", OBJECT, None) or value("rope_scaling", OBJECT, None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"{path}: rope type {kind!r} is not supported (only the default and "
                        "'llama3')")
    scaling = None
    if kind == "llama3":
        scaling = {key: value(key, rule, values=rope)
                   for key, rule in LLAMA3_SCALING_RULES.items()}
    dim = value("hidden_size", SIZE)
    n_layers = value("num_hidden_layers", SIZE)
    n_heads = value("num_attention_heads", SIZE)
    return model_config(path, dim=dim, n_layers=n_layers, n_heads=n_heads,
                        n_kv_heads=value("num_key_value_heads", SIZE, n_heads),
                        ffn_hidden=value("intermediate_size", SIZE),
                        vocab_size=value("vocab_size", SIZE),
                        norm_eps=value("rms_norm_eps", POSITIVE, 1e-6),
                        rope_theta=value("rope_theta", POSITIVE, None)
                        or value("rope_theta", POSITIVE, 10000.0, values=rope),
                        rope_scaling=scaling,
                        max_seq_len=value("max_position_embeddings", SIZE, 4096),
                        tie_embeddings=value("tie_word_embeddings", FLAG, False),
                        head_dim=value("head_dim", SIZE, None))


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


# ---------------------------------------------------------------- this project's own format

def read_own(d: Path):
    """model_config.json (our ModelConfig's fields) + model.safetensors under our names."""
    path = d / "model_config.json"
    fields = read_json(path)
    unknown = sorted(fields.keys() - {field.name for field in dataclass_fields(ModelConfig)})
    if unknown:
        raise UserError(f"{path}: not a model config of this project (unknown keys: "
                        f"{', '.join(unknown)})")
    config = model_config(path, **fields)
    weights = [d / "model.safetensors"]
    check_layer_count(d, config, _count_safetensors(weights))
    return config, ((k, k, t) for k, t in _read_safetensors(weights))


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
