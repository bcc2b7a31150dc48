"""The other formats LLaMA checkpoints come in: Meta's original release and llama2.c's.

    directory with params.json + consolidated.*.pth   Meta (Llama-2, Llama-3.x), one shard per GPU
    *.pt with `model` and `model_args`                 llama2.c's training checkpoint
    *.bin with a 7-int header, then float32 tensors    llama2.c's legacy export (stories260K.bin)

Both use Meta's tensor names (`layers.0.attention.wq.weight`) and Meta's q/k row order, which is
ours: only the names change. Each reader returns (config, iterator of (name in the file, our
name, tensor)), like those of formats/checkpoint.py, which picks the reader (read_checkpoint).
"""
import math
import struct
from pathlib import Path

import numpy as np
import torch

from formats.files import (REQUIRED, check_layer_count, config_value, model_config, name_map,
                           read_json, read_state_dict, read_torch_file, state_dict_of)
from errors import UserError
from model import FLAG, POSITIVE, SIZE, ModelConfig, Transformer, llama3_scaling

META_NAMES = {  # ours: Meta's
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_LAYER_PREFIX = "layers.{}."
META_LAYER_NAMES = {  # ours: Meta's, within one block
    "attn_norm.weight": "attention_norm.weight",
    "attn.q_proj.weight": "attention.wq.weight",
    "attn.k_proj.weight": "attention.wk.weight",
    "attn.v_proj.weight": "attention.wv.weight",
    "attn.o_proj.weight": "attention.wo.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def meta_names(n_layers: int) -> dict:
    """{Meta's name: our name} for every tensor of an n_layers model."""
    return name_map(META_NAMES, META_LAYER_NAMES, META_LAYER_PREFIX, n_layers)


# ---------------------------------------------------------------- Meta

def read_meta(d: Path):
    shards = sorted(d.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{d}: params.json but no consolidated.*.pth weights")
    params = read_json(d / "params.json")
    loaded = [read_state_dict(f) for f in shards]
    embedding = loaded[0].get("tok_embeddings.weight")
    if embedding is None or embedding.dim() != 2:
        raise UserError(f"{shards[0]}: no tok_embeddings.weight matrix: not a Meta Llama shard")
    for shard, state in zip(shards[1:], loaded[1:]):
        if state.keys() != loaded[0].keys():
            raise UserError(f"{shard}: holds other tensors than {shards[0].name}: the shards "
                            "are not of one model")
    config = config_from_meta(params, vocab_size=embedding.shape[0], path=d / "params.json")
    # Llama-3.2 1B/3B ship no separate head
    config.tie_embeddings = "output.weight" not in loaded[0]
    check_layer_count(d, config, len(loaded[0]))
    names = meta_names(config.n_layers)
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


def config_from_meta(p: dict, vocab_size: int | None = None, path="params.json") -> ModelConfig:
    """From Meta's `params.json`. The SwiGLU width is not stored there, only the recipe for it.
    vocab_size: the embedding's row count, for files whose params.json says -1. `path` names the
    file in error messages."""
    def value(key, rule, default=REQUIRED):
        return config_value(p, key, path, rule, default)
    dim = value("dim", SIZE)
    n_layers = value("n_layers", SIZE)
    n_heads = value("n_heads", SIZE)
    # 2/3 of the classic 4·dim, so SwiGLU's 3 matrices cost what 2 did
    hidden = int(2 * (4 * dim) / 3)
    if value("ffn_dim_multiplier", POSITIVE, None):
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    multiple_of = value("multiple_of", SIZE, 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    scaling = None
    if value("use_scaled_rope", FLAG, False):  # Llama-3.1+: the constants Meta's code hard-codes;
        # params.json does not say the factor: 32 for the Llama-3.2 1B/3B shapes, 8 otherwise
        # (3.1), as in the Hugging Face configs of those models.
        llama32 = (dim, n_layers) in ((2048, 16), (3072, 28))
        factor = value("rope_scaling_factor", POSITIVE, None) or (32.0 if llama32 else 8.0)
        scaling = llama3_scaling(factor)
    if p.get("vocab_size", -1) != -1:  # (-1: not stored)
        vocab_size = value("vocab_size", SIZE)
    return model_config(path, dim=dim, n_layers=n_layers, n_heads=n_heads,
                        n_kv_heads=value("n_kv_heads", SIZE, n_heads),
                        ffn_hidden=hidden,
                        vocab_size=vocab_size,
                        norm_eps=value("norm_eps", POSITIVE, 1e-5),
                        rope_theta=value("rope_theta", POSITIVE, 10000.0),
                        rope_scaling=scaling,
                        max_seq_len=value("max_seq_len", SIZE, 4096))


# ---------------------------------------------------------------- llama2.c

def read_llama2c_pt(path: Path):
    """llama2.c's train.py checkpoint: {"model": state dict under Meta's names, "model_args"}."""
    ckpt = read_torch_file(path)
    args = ckpt.get("model_args")
    if not isinstance(args, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a llama2.c training checkpoint (expected keys 'model' "
                        "and 'model_args')")
    # a torch.compile'd model's state dict has every name under _orig_mod.
    state = {k.removeprefix("_orig_mod."): v
             for k, v in state_dict_of(path, ckpt["model"]).items()}
    gate = state.get("layers.0.feed_forward.w1.weight")
    if gate is None or gate.dim() != 2:
        raise UserError(f"{path}: no layers.0.feed_forward.w1.weight matrix: not a llama2.c "
                        "model")

    def value(key, rule, default=REQUIRED):
        return config_value(args, key, path, rule, default)
    n_heads = value("n_heads", SIZE)
    config = model_config(path, dim=value("dim", SIZE),
                          n_layers=value("n_layers", SIZE),
                          n_heads=n_heads,
                          n_kv_heads=value("n_kv_heads", SIZE, n_heads),
                          vocab_size=value("vocab_size", SIZE),
                          ffn_hidden=gate.shape[0],
                          norm_eps=value("norm_eps", POSITIVE, 1e-5),
                          max_seq_len=value("max_seq_len", SIZE, 2048),
                          tie_embeddings=True)  # llama2.c always ties the head to the embedding
    check_layer_count(path, config, len(state))
    names = meta_names(config.n_layers)
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
    config = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                         ffn_hidden=hidden, vocab_size=abs(vocab), max_seq_len=seq_len,
                         tie_embeddings=vocab > 0)
    if size != 28 + 4 * _llama2c_floats(config):
        return None
    return config


def _llama2c_layout(c: ModelConfig):
    """(our name, shape) of each tensor of the .bin, in file order. Per-layer tensors are stored
    stacked over the layers (shape starting with n_layers); freq_cis_* are RoPE tables."""
    L = c.n_layers
    kv = c.n_kv_heads * c.head_dim
    half_head = c.head_dim // 2
    layout = [("embed_tokens.weight", (c.vocab_size, c.dim)),
              ("attn_norm.weight", (L, c.dim)),
              ("attn.q_proj.weight", (L, c.dim, c.dim)),
              ("attn.k_proj.weight", (L, kv, c.dim)),
              ("attn.v_proj.weight", (L, kv, c.dim)),
              ("attn.o_proj.weight", (L, c.dim, c.dim)),
              ("mlp_norm.weight", (L, c.dim)),
              ("mlp.gate_proj.weight", (L, c.ffn_hidden, c.dim)),
              ("mlp.down_proj.weight", (L, c.dim, c.ffn_hidden)),
              ("mlp.up_proj.weight", (L, c.ffn_hidden, c.dim)),
              ("norm.weight", (c.dim,)),
              ("freq_cis_real", (c.max_seq_len, half_head)),
              ("freq_cis_imag", (c.max_seq_len, half_head))]
    if not c.tie_embeddings:
        layout.append(("lm_head.weight", (c.vocab_size, c.dim)))
    return layout


def _llama2c_floats(c: ModelConfig) -> int:
    # (math.prod: Python's ints, where numpy's int64 product of a crafted header could wrap)
    return sum(math.prod(shape) for _, shape in _llama2c_layout(c))


def read_llama2c_bin(path: Path, config: ModelConfig):
    data = np.memmap(path, dtype=np.float32, mode="c", offset=28)  # copy-on-write view, no RAM copy

    def tensors():
        offset = 0
        for name, shape in _llama2c_layout(config):
            n = math.prod(shape)
            t = torch.from_numpy(data[offset:offset + n].reshape(shape))
            offset += n
            if name.startswith("freq_cis"):
                continue  # RoPE tables: we compute them from the config
            if name in META_LAYER_NAMES:  # a per-layer tensor (our name), stored stacked
                for layer in range(config.n_layers):
                    yield name, f"layers.{layer}.{name}", t[layer]
            else:
                yield name, name, t
    return config, tensors()
