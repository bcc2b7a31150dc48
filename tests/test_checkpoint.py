"""Loading and saving every checkpoint format, checked against transformers' LlamaForCausalLM.

The reference is always an independent implementation: transformers computes the logits, and the
conversions into Meta's and llama2.c's layouts are written out here from the formats' own
definitions (not with checkpoint.py's helpers), so a mistake in checkpoint.py cannot cancel out.
"""
import copy
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from formats import checkpoint
from formats.checkpoint import (config_from_hf, config_to_hf, load_checkpoint, save_checkpoint,
                                save_hf_checkpoint)
from conftest import shared_path
from errors import UserError
from formats.meta_llama2c import config_from_meta
from model import PRESETS, ModelConfig, Transformer

# the reference oracle (requirements-dev.txt); without it only the tests comparing with it
# skip
try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    LlamaConfig = LlamaForCausalLM = None

TOL = 1e-4
SEQ = 64  # > 2 × original_max_position_embeddings below, so the Llama-3.1 rope scaling matters
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# as ModelConfig holds it
LLAMA3_SCALING = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
# Meta's params.json cannot spell the constants above: Meta's code hard-codes an 8192-token
# original context.
META_LLAMA3_ROPE = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-5)
STYLES = {
    # MHA, untied, default rope. ffn 192 = Meta's recipe for dim 64 with multiple_of 48
    # (170 → 192).
    "llama2": dict(COMMON, num_key_value_heads=4, intermediate_size=192, rope_theta=10000.0,
                   tie_word_embeddings=False),
    # GQA, tied, Llama-3.1 rope. ffn 224 = int(1.3 · 170) = 221 → multiple_of 32 → 224.
    "llama3": dict(COMMON, num_key_value_heads=2, intermediate_size=224, rope_theta=500000.0,
                   tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    # llama2.c: GQA, tied, default rope
    "llama2c": dict(COMMON, num_key_value_heads=2, intermediate_size=172, rope_theta=10000.0,
                    tie_word_embeddings=True),
}
META_PARAMS = {
    "llama2": {"dim": 64, "multiple_of": 48, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5,
               "vocab_size": -1},
    "llama3": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96,
               "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
               "rope_theta": 500000.0, "use_scaled_rope": True},
}


def build_hf(style, seed=0, **overrides):
    """A random LlamaForCausalLM whose weights are large enough that attention is sharp (so RoPE
    and the q/k row order matter) and whose norm weights are not all ones (so swapped norms would
    show)."""
    if LlamaForCausalLM is None:
        pytest.skip("transformers is not installed (pip install -r requirements-dev.txt)")
    torch.manual_seed(seed)
    # it edits dicts given
    model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy({**STYLES[style], **overrides}))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def tokens(vocab=96, batch=2, seq=SEQ, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{style: (hf_model, reference logits, directory saved with save_pretrained)}."""
    x = tokens()
    out = {}
    for style in ("llama2", "llama3", "llama2c"):
        m = build_hf(style)
        d = tmp_path_factory.mktemp(f"hf_{style}")
        m.save_pretrained(d)
        out[style] = (m, logits_of(m, x), d)
    return out


# ---------------------------------------------------------------- Hugging Face

def _sharded(m, d):
    m.save_pretrained(d, max_shard_size="20KB")
    return d


# transformers 5 always writes safetensors; pytorch_model.bin as transformers 4 wrote it
def _bin(m, d):
    m.save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    return d


def _bin_sharded(m, d):
    m.save_pretrained(d)
    (d / "model.safetensors").unlink()
    sd = m.state_dict()
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, d / name)
        weight_map.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {},
                                                                "weight_map": weight_map}))
    return d


def _file(m, d):  # the model.safetensors file itself, not its directory
    m.save_pretrained(d)
    return d / "model.safetensors"


@pytest.mark.parametrize("style", ["llama2", "llama3"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin_sharded", "file"])
def test_hf_parity(hf, tmp_path, style, layout):
    m, ref, d = hf[style]
    if layout != "safetensors":
        d = {"sharded": _sharded, "bin": _bin, "bin_sharded": _bin_sharded,
             "file": _file}[layout](m, tmp_path)
    if layout == "sharded":
        assert (d / "model.safetensors.index.json").exists() and \
            len(list(d.glob("model-*.safetensors"))) >= 3
    model, config = load_checkpoint(d)
    assert config.n_kv_heads == STYLES[style]["num_key_value_heads"]
    assert config.tie_embeddings == STYLES[style]["tie_word_embeddings"]
    assert config.rope_scaling == ({k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
                                   if style == "llama3" else None)
    assert max_diff(logits_of(model, tokens()), ref) <= TOL


def test_hf_parity_is_sensitive(hf):
    """The parity tests can fail: q/k rows left in Hugging Face's order, or the rope scaling
    dropped, move the logits far beyond the tolerance."""
    _, ref, d = hf["llama3"]
    model, config = load_checkpoint(d)
    x = tokens()
    with torch.no_grad():
        for layer in model.layers:  # back to HF's half-split row order
            for proj, n in ((layer.attn.q_proj, config.n_heads),
                            (layer.attn.k_proj, config.n_kv_heads)):
                proj.weight.copy_(_meta_to_hf_rows(proj.weight, n))
    assert max_diff(logits_of(model, x), ref) > 1e-2
    model, config = load_checkpoint(d)
    model.config.rope_scaling = None
    assert max_diff(logits_of(model, x), ref) > 1e-3


def _hf_to_meta_rows(w, n_heads):
    """HF stores each head's rows as [x0, x2, x4, ..., x1, x3, ...] (rotate_half); Meta as pairs
    [x0, x1, x2, x3, ...]. Meta row h·hd + 2j + s is HF row h·hd + s·hd/2 + j."""
    hd = w.shape[0] // n_heads
    idx = [h * hd + (i % 2) * (hd // 2) + i // 2 for h in range(n_heads) for i in range(hd)]
    return w[idx].clone()


def _meta_to_hf_rows(w, n_heads):
    hd = w.shape[0] // n_heads
    idx = [h * hd + 2 * (i % (hd // 2)) + i // (hd // 2) for h in range(n_heads) for i in range(hd)]
    return w[idx].clone()


def test_row_orders_are_inverse():
    w = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)
    assert torch.equal(_meta_to_hf_rows(_hf_to_meta_rows(w, 4), 4), w)
    assert _hf_to_meta_rows(w, 4)[:4, 0].tolist() == [0, 12, 3, 15]  # hd 8: HF rows 0, 4, 1, 5
    assert torch.equal(checkpoint.hf_permute(w, 4, to_hf=False), _hf_to_meta_rows(w, 4))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_round_trip(name):
    c = ModelConfig.from_name(name)
    hf = config_to_hf(c)
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert config_from_hf(hf) == c


def test_from_hf_both_spellings():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 80,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "tie_word_embeddings": True}
    v4 = {**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}}
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                      **LLAMA3_SCALING}}
    # pre-4.45 key
    old = {**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}}
    configs = [config_from_hf(c) for c in (v4, v5, old)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope_scaling == LLAMA3_SCALING and configs[0].rope_theta == 500000.0
    assert configs[0].tie_embeddings and configs[0].n_kv_heads == 2 and configs[0].head_dim == 16
    default = config_from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": 10000.0}})
    assert default.rope_scaling is None and default.rope_theta == 10000.0
    mha = config_from_hf({k: v for k, v in base.items() if k != "num_key_value_heads"})
    assert mha.n_kv_heads == 4
    with pytest.raises(UserError, match="rope type 'linear' is not supported"):
        config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})


# ---------------------------------------------------------------- Meta

META_NAMES = {"embed_tokens": "tok_embeddings.weight", "norm": "norm.weight",
              "lm_head": "output.weight"}
META_LAYER = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
              "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3"}


def to_meta(hf_model):
    """The state dict of Meta's reference `Transformer` (llama/model.py) holding the HF model's
    weights."""
    c = hf_model.config
    out = {}
    for name, t in hf_model.state_dict().items():
        t = t.clone()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            if module == "self_attn.q_proj":
                t = _hf_to_meta_rows(t, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                t = _hf_to_meta_rows(t, c.num_key_value_heads)
            out[f"layers.{i}.{META_LAYER[module]}.weight"] = t
        else:
            out[META_NAMES[name.removeprefix("model.").removesuffix(".weight")]] = t
    out["rope.freqs"] = torch.randn(8)  # Meta's Llama-2 files carry this unused buffer
    return out


def split_meta(sd, embedding_axis):
    """Two model-parallel shards, split as Meta's fairscale layers split them: column-parallel
    (wq, wk, wv, w1, w3, output) by output rows, row-parallel (wo, w2) by input columns, norms
    copied."""
    shards = ({}, {})
    for name, t in sd.items():
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or \
                name == "output.weight":
            axis = 0
        elif name.endswith(("wo.weight", "w2.weight")):
            axis = 1
        elif name == "tok_embeddings.weight":
            # Llama-2: ParallelEmbedding (dim 1); Llama-3: VocabParallelEmbedding (dim 0)
            axis = embedding_axis
        else:
            axis = None
        parts = (t, t) if axis is None else t.chunk(2, dim=axis)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def _meta_reference(hf, style):
    """(HF model, logits) with the rope that Meta's params.json describes."""
    m, ref, _ = hf[style]
    if style != "llama3":
        return m, ref
    m8192 = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(
        {**STYLES[style], "rope_scaling": META_LLAMA3_ROPE}))).eval()
    m8192.load_state_dict(m.state_dict())
    return m8192, logits_of(m8192, tokens())


@pytest.mark.parametrize("style", ["llama2", "llama3"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_parity(hf, tmp_path, style, n_shards):
    m, ref = _meta_reference(hf, style)
    sd = to_meta(m)
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS[style]))
    shards = [sd] if n_shards == 1 else split_meta(sd, embedding_axis=1 if style == "llama2" else 0)
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    if n_shards == 2:
        assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    model, config = load_checkpoint(tmp_path)
    # 192 / 224: multiple_of and ffn_dim_multiplier
    assert config.ffn_hidden == STYLES[style]["intermediate_size"]
    assert config.vocab_size == 96 and config.n_kv_heads == STYLES[style]["num_key_value_heads"]
    if style == "llama3":
        assert config.rope_theta == 500000.0 and \
            config.rope_scaling["original_max_position_embeddings"] == 8192
    assert max_diff(logits_of(model, tokens()), ref) <= TOL


@pytest.mark.parametrize("params, ffn", [
    ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-5,
      "vocab_size": -1}, 11008),  # Llama-2-7B
    ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-5,
      "vocab_size": -1}, 13824),  # Llama-2-13B
    ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
      "n_layers": 80, "norm_eps": 1e-5, "vocab_size": -1}, 28672),  # Llama-2-70B
    ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
      "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0},
     14336),  # Llama-3-8B
])
def test_from_meta_ffn_width(params, ffn):
    c = config_from_meta(params, vocab_size=32000)
    assert c.ffn_hidden == ffn
    assert c.vocab_size == (params["vocab_size"] if params["vocab_size"] > 0 else 32000)
    assert c.n_kv_heads == params.get("n_kv_heads", params["n_heads"])


def test_from_meta_scaled_rope():
    p = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
         "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
         "use_scaled_rope": True}  # Llama-3.1-8B
    c = config_from_meta(p)
    assert c.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    assert c == ModelConfig(**{**PRESETS["llama-3.1-8b"], "max_seq_len": 4096})
    # Llama-3.2-1B's params.json (no factor given): 32, as in its Hugging Face config
    p32 = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0,
           "use_scaled_rope": True}
    c32 = config_from_meta(p32)
    assert c32.rope_scaling == PRESETS["llama-3.2-1b"]["rope_scaling"] and c32.ffn_hidden == 8192


# ---------------------------------------------------------------- llama2.c

@pytest.mark.parametrize("compiled", [False, True])
def test_llama2c_pt(hf, tmp_path, compiled):
    m, ref, _ = hf["llama2c"]
    sd = to_meta(m)
    del sd["rope.freqs"]
    # llama2.c ties them: one tensor under two names
    sd["output.weight"] = sd["tok_embeddings.weight"]
    if compiled:  # train.py saves the torch.compile'd module's state dict
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=None,
                multiple_of=32, norm_eps=1e-5, max_seq_len=128, dropout=0.0)
    torch.save({"model": sd, "optimizer": {}, "model_args": args, "iter_num": 100,
                "best_val_loss": 1.5, "config": {"batch_size": 8}}, tmp_path / "ckpt.pt")
    model, config = load_checkpoint(tmp_path / "ckpt.pt")
    assert config.tie_embeddings and config.ffn_hidden == 172 and config.max_seq_len == 128
    assert model.lm_head.weight is model.embed_tokens.weight
    assert max_diff(logits_of(model, tokens()), ref) <= TOL
    # the directory holding it is found too
    assert max_diff(logits_of(load_checkpoint(tmp_path)[0], tokens()), ref) <= TOL


def write_llama2c_bin(path, meta_sd, n_heads, n_kv_heads, seq_len, tied):
    """llama2.c export.py `legacy_export` (version 0), written out from its source."""
    L = 1 + max(int(k.split(".")[1]) for k in meta_sd if k.startswith("layers."))
    emb = meta_sd["tok_embeddings.weight"]
    vocab, dim = emb.shape
    hidden = meta_sd["layers.0.feed_forward.w1.weight"].shape[0]
    hd = dim // n_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    with open(path, "wb") as f:
        f.write(struct.pack("iiiiiii", dim, hidden, L, n_heads, n_kv_heads,
                            vocab if tied else -vocab, seq_len))
        write = lambda t: f.write(t.detach().float().contiguous().numpy().tobytes())
        write(emb)
        for name in ("attention_norm", "attention.wq", "attention.wk", "attention.wv",
                     "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w2",
                     "feed_forward.w3"):
            for i in range(L):
                write(meta_sd[f"layers.{i}.{name}.weight"])
        write(meta_sd["norm.weight"])
        write(angles.cos())
        write(angles.sin())
        if not tied:
            write(meta_sd["output.weight"])


@pytest.mark.parametrize("style", ["llama2", "llama2c"])
def test_llama2c_bin(hf, tmp_path, style):
    m, ref, _ = hf[style]
    tied = STYLES[style]["tie_word_embeddings"]
    write_llama2c_bin(tmp_path / "model.bin", to_meta(m), 4, STYLES[style]["num_key_value_heads"],
                      128, tied)
    model, config = load_checkpoint(tmp_path / "model.bin")
    assert config.tie_embeddings == tied and config.vocab_size == 96 and config.max_seq_len == 128
    assert max_diff(logits_of(model, tokens()), ref) <= TOL


# ----------------------------------------------------------- GGUF (written here from the GGUF spec)

GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
GGUF_LAYER = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
              "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate",
              "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up"}


def write_gguf(path, tensors, metadata, magic=b"GGUF"):
    """GGUF v3: magic, version, counts, key/values, tensor infos (dims innermost first),
    32-aligned data.
    tensors: {name: (ggml type, bytes, shape)}; metadata values: str, int (u32) or float (f32)."""
    s = lambda text: struct.pack("<Q", len(text.encode())) + text.encode()
    out = bytearray(magic + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += s(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + s(value)
        elif isinstance(value, float):
            out += struct.pack("<If", 6, value)
        else:
            out += struct.pack("<II", 4, value)
    offset, blobs = 0, []
    for name, (kind, data, shape) in tensors.items():
        out += s(name) + struct.pack("<I", len(shape)) + \
            b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", kind, offset)
        blobs.append(data + b"\0" * (-len(data) % 32))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % 32)
    path.write_bytes(bytes(out) + b"".join(blobs))


def _gguf_tensors(model, kind):
    dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[kind]
    out = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers":
            gguf = f"blk.{parts[1]}.{GGUF_LAYER['.'.join(parts[2:-1])]}.weight"
        else:
            gguf = GGUF_NAMES[parts[0]] + ".weight"
        # llama.cpp keeps norms f32
        t_kind, t_dtype = (0, torch.float32) if name.endswith("norm.weight") else (kind, dtype)
        raw = t.detach().to(t_dtype).contiguous().view(torch.uint8).numpy().tobytes()
        out[gguf] = (t_kind, raw, tuple(t.shape))
    return out


GGUF_META = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
             "llama.feed_forward_length": 192, "llama.attention.head_count": 4,
             "llama.attention.head_count_kv": 4,
             "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
             "llama.context_length": 128, "llama.vocab_size": 96}


@pytest.mark.parametrize("kind", [0, 1, 30])  # f32, f16, bf16
def test_gguf_dtypes(hf, tmp_path, kind):
    ours, _ = load_checkpoint(hf["llama2"][2])
    write_gguf(tmp_path / "m.gguf", _gguf_tensors(ours, kind), GGUF_META)
    model, config = load_checkpoint(tmp_path / "m.gguf")
    assert not config.tie_embeddings and config.ffn_hidden == 192 and config.vocab_size == 96
    dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[kind]
    expected = ours.state_dict()
    for name, p in model.state_dict().items():
        want = expected[name] if name.endswith("norm.weight") else expected[name].to(dtype).float()
        assert p.dtype == torch.float32 and torch.equal(p, want), name
    if kind == 0:
        assert max_diff(logits_of(model, tokens()), hf["llama2"][1]) <= TOL


def test_gguf_rejections(hf, tmp_path):
    ours, _ = load_checkpoint(hf["llama2"][2])
    tensors = _gguf_tensors(ours, 0)
    write_gguf(tmp_path / "bad_magic.gguf", tensors, GGUF_META, magic=b"GGUG")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_checkpoint(tmp_path / "bad_magic.gguf")
    write_gguf(tmp_path / "gpt2.gguf", tensors, {**GGUF_META, "general.architecture": "gpt2"})
    with pytest.raises(UserError, match="architecture 'gpt2'"):
        load_checkpoint(tmp_path / "gpt2.gguf")
    name = "blk.1.ffn_up.weight"
    tensors[name] = (10, tensors[name][1], tensors[name][2])  # Q2_K (others: test_gguf.py)
    write_gguf(tmp_path / "q2_k.gguf", tensors, GGUF_META)
    unsupported = rf"tensor {name} has ggml type Q2_K \(id 10\), which cannot be loaded"
    with pytest.raises(UserError, match=unsupported + "; supported: F32, F16, Q4_0, .*, BF16$"):
        load_checkpoint(tmp_path / "q2_k.gguf")


# -------------------------------------------------------------- this project's format and HF export

@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_own_format_round_trip(hf, tmp_path, style):
    model, config = load_checkpoint(hf[style][2])
    save_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model_config.json"]
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) != config.tie_embeddings  # a tied matrix is stored once
    again, config2 = load_checkpoint(tmp_path)
    assert config2 == config
    assert torch.equal(logits_of(again, tokens()), logits_of(model, tokens()))


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_save_hf_checkpoint_loads_in_transformers(hf, tmp_path, style):
    model, _ = load_checkpoint(hf[style][2])
    save_hf_checkpoint(model, tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.tie_word_embeddings == STYLES[style]["tie_word_embeddings"]
    assert max_diff(logits_of(theirs, tokens()), logits_of(model, tokens())) <= TOL
    assert max_diff(logits_of(theirs, tokens()), hf[style][1]) <= TOL
    # and exported weights equal the original HF weights exactly (q/k permuted back)
    original = hf[style][0].state_dict()
    for name, t in load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(t, original[name]), name


def test_save_hf_checkpoint_dtype(hf, tmp_path):
    model, _ = load_checkpoint(hf["llama2"][2])
    save_hf_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16
               for t in load_file(tmp_path / "model.safetensors").values())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------- memory-safe loading

def test_load_builds_on_meta_and_assigns(hf, monkeypatch):
    built_on = []

    class Spy(Transformer):
        def __init__(self, config):
            super().__init__(config)
            built_on.append(self.embed_tokens.weight.device.type)

    monkeypatch.setattr(checkpoint, "Transformer", Spy)
    model, _ = load_checkpoint(hf["llama3"][2], dtype=torch.bfloat16)
    assert built_on and set(built_on) == {"meta"}
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params.values())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert max_diff(logits_of(model, tokens()).float(), hf["llama3"][1]) < 0.5  # bf16, same model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embeddings_stay_tied(hf, dtype):
    model, _ = load_checkpoint(hf["llama3"][2], dtype=dtype)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight.dtype == dtype
    with torch.no_grad():  # still one matrix: writing one changes the other
        model.embed_tokens.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0].item() == 123.0


# ---------------------------------------------------------------- the real stories260K checkpoint

STORIES_GREEDY = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
                  401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385]
STORIES_CE_SEQ = [1] + STORIES_GREEDY[:31]
STORIES_TOP5 = [403, 385, 410, 317, 407]
STORIES_TOP5_VALUES = [17.0235, 15.4062, 13.1083, 12.7692, 12.4181]


@pytest.fixture(scope="module")
def stories():
    d = shared_path("models", "stories260K")
    return {src: load_checkpoint(path) for src, path in
            (("dir", d), ("bin", d / "stories260K.bin"), ("gguf", d / "stories260K.gguf"))}


@pytest.mark.parametrize("src", ["dir", "bin", "gguf"])
def test_stories260k_reference(stories, src):
    model, config = stories[src]
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_hidden,
            config.vocab_size) == (64, 5, 8, 4, 172, 512)
    if src == "gguf":  # llama.cpp's converter stored output.weight, a copy of token_embd.weight
        assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    else:
        assert config.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    model.eval()
    with torch.no_grad():
        top = logits_of(model, torch.tensor([[1]]))[0, 0].topk(5)
        assert top.indices.tolist() == STORIES_TOP5
        assert np.allclose(top.values.tolist(), STORIES_TOP5_VALUES, atol=1e-4, rtol=0)
        seq = torch.tensor([STORIES_CE_SEQ])
        loss = model.loss(seq, seq).item() / (len(STORIES_CE_SEQ) - 1)
        assert abs(loss - 0.180356) <= 1e-4
        # greedy decoding from BOS: each argmax is the next token, so one forward pass checks all 32
        greedy_in = torch.tensor([[1] + STORIES_GREEDY[:-1]])
        assert logits_of(model, greedy_in)[0].argmax(-1).tolist() == STORIES_GREEDY


def test_stories260k_formats_agree(stories):
    """The .bin and the llama.cpp .gguf are independent conversions: bit-identical weights."""
    a, b = stories["bin"][0].state_dict(), stories["gguf"][0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- bad input

def _hf_dir(hf, tmp_path, edit):
    """A copy of the llama2-style HF directory whose state dict went through edit(dict)."""
    src = hf["llama2"][2]
    shutil.copy(src / "config.json", tmp_path / "config.json")
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors")
    return tmp_path


def test_error_no_checkpoint_in_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    msg = str(e.value)
    assert "no checkpoint found" in msg
    for expected in ("config.json", "model*.safetensors", "pytorch_model*.bin", "params.json",
                     "consolidated.*.pth", ".bin", ".pt", ".gguf", "model_config.json"):
        assert expected in msg


def test_error_nonexistent_path(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_error_config_without_weights(hf, tmp_path):
    shutil.copy(hf["llama2"][2] / "config.json", tmp_path)
    with pytest.raises(UserError, match="config.json but no weights"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name, shape", [("model.layers.1.self_attn.v_proj.weight", (60, 64)),
                                         ("model.layers.0.self_attn.q_proj.weight", (63, 64)),
                                         ("model.embed_tokens.weight", (95, 64))])
def test_error_shape_mismatch(hf, tmp_path, name, shape):
    expected = tuple(load_file(hf["llama2"][2] / "model.safetensors")[name].shape)
    d = _hf_dir(hf, tmp_path, lambda sd: sd.__setitem__(name, torch.zeros(shape)))
    with pytest.raises(UserError) as e:
        load_checkpoint(d)
    assert name in str(e.value) and str(shape) in str(e.value) and str(expected) in str(e.value)


def test_error_missing_and_unexpected_tensors(hf, tmp_path):
    def edit(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]
        del sd["model.norm.weight"]
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
        # old HF files: harmless, ignored
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)

    with pytest.raises(UserError) as e:
        load_checkpoint(_hf_dir(hf, tmp_path, edit))
    msg = str(e.value)
    assert "missing 2 tensors (layers.1.mlp.up_proj.weight, norm.weight)" in msg
    assert "unexpected 1 tensors (model.layers.0.mlp.extra.weight)" in msg
    assert "rotary_emb" not in msg


def test_error_unexpected_only(hf, tmp_path):
    d = _hf_dir(hf, tmp_path, lambda sd: sd.__setitem__("model.layers.7.mlp.up_proj.weight",
                                                        torch.zeros(192, 64)))
    with pytest.raises(UserError,
                       match=r"unexpected 1 tensors \(model.layers.7.mlp.up_proj.weight\)") as e:
        load_checkpoint(d)
    assert "missing" not in str(e.value)


def test_error_corrupt_config_json(hf, tmp_path):
    shutil.copy(hf["llama2"][2] / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "num_hidden_')
    with pytest.raises(UserError, match="config.json: not readable JSON"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("key, value", [("max_position_embeddings", 0), ("num_hidden_layers", -1),
                                        ("hidden_size", 64.5)])
def test_error_impossible_size_in_config_json(tmp_path, key, value):
    """One line naming the file and the key (the config is read before the weights)."""
    (tmp_path / "config.json").write_text(json.dumps({**STYLES["llama2"], key: value}))
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    path = tmp_path / "config.json"
    assert str(e.value) == f"{path}: {key} is {value!r}, but it must be a whole number >= 1"


def test_error_config_json_of_another_model(hf, tmp_path):
    shutil.copy(hf["llama2"][2] / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 64}')
    with pytest.raises(UserError,
                       match="config.json: not a Llama model config .*num_hidden_layers"):
        load_checkpoint(tmp_path)


def test_error_corrupt_safetensors(hf, tmp_path):
    shutil.copy(hf["llama2"][2] / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00"
                                                 b"{not json}......")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_error_truncated_llama2c_bin(tmp_path):
    data = shared_path("models", "stories260K", "stories260K.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:-4])
    with pytest.raises(UserError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "model.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:20])  # shorter than the header
    with pytest.raises(UserError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "tiny.bin")


def test_error_garbage_pt(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"this is not a zip or pickle" * 10)
    with pytest.raises(UserError, match="cannot be read as a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a llama2.c training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_error_meta_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS["llama2"]))
    with pytest.raises(UserError, match=r"params.json but no consolidated"):
        load_checkpoint(tmp_path)
