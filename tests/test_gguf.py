"""llama.cpp's GGUF files, quantised, checked against the `gguf` package and transformers.

The `gguf` package is llama.cpp's own Python library: its numpy (de)quantisers are the oracle for
every block format here, and its GGUFWriter writes the test files. gguf_file.py must not use it.
The real SmolLM2-135M-Instruct Q4_1 file is compared with transformers' GGUF loader, logit by logit.
"""
import ast
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

from formats import gguf_file
from formats.checkpoint import load_checkpoint
from errors import UserError
from model import llama3_scaling

ROOT = Path(__file__).resolve().parent.parent
QUANTISED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
FLOATS = ["F32", "F16", "BF16"]
GGUF_CAN_QUANTISE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# Where each block keeps its fp16 scale fields (byte offsets), from ggml-common.h's block structs.
# Random bytes there could be inf or NaN; the tests put modest finite scales in instead.
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(type_name: str, n_blocks: int, rng) -> np.ndarray:
    """(n_blocks, bytes per block) uint8: random codes and scales, with finite fp16 scales."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[GGMLType[type_name]]
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[type_name]:
        scale = rng.uniform(-0.1, 0.1, (n_blocks, 1)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8)
    return blocks


def encode(type_name: str, weights: np.ndarray, rng) -> np.ndarray:
    """Float weights in a ggml type, by the gguf package; where it cannot quantise (K-quants),
    random blocks from `rng` instead."""
    if type_name == "F32":
        return weights.astype(np.float32)
    if type_name == "F16":
        return weights.astype(np.float16)
    if type_name in GGUF_CAN_QUANTISE + ["BF16"]:
        return gguf.quants.quantize(weights, GGMLType[type_name])
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[GGMLType[type_name]]
    rows, cols = weights.shape
    blocks = random_blocks(type_name, rows * cols // block_size, rng)
    return blocks.reshape(rows, cols // block_size * block_bytes)


def gguf_dequantize(type_name: str, data: np.ndarray) -> torch.Tensor:
    """The oracle: the gguf package's dequantisation of stored data, as a float32 tensor."""
    if data.dtype != np.uint8:  # F32 and F16 are stored as themselves
        return torch.from_numpy(data.astype(np.float32))
    weights = gguf.quants.dequantize(data, GGMLType[type_name])
    return torch.from_numpy(np.ascontiguousarray(weights))


def ours(type_name: str, data: np.ndarray, shape) -> torch.Tensor:
    raw = torch.from_numpy(data.view(np.uint8).copy()).reshape(-1)
    return gguf_file.dequantize(raw, int(GGMLType[type_name]), shape)


# ---------------------------------------------------------------- the block formats

def test_type_table_matches_ggml():
    for type_id, kind in gguf_file.GGML_TYPES.items():
        assert GGMLType(type_id).name == kind.name
        assert gguf.GGML_QUANT_SIZES[GGMLType(type_id)] == (kind.block_size, kind.block_bytes)
    for type_id, name in gguf_file.OTHER_TYPE_NAMES.items():
        assert GGMLType(type_id).name == name


@pytest.mark.parametrize("type_name", QUANTISED)
def test_random_blocks_match_gguf(type_name):
    """Random bytes in every code and 6-bit scale, finite fp16 scales: 3 rows of 8 blocks."""
    rng = np.random.default_rng(0)
    blocks = random_blocks(type_name, 24, rng)
    data = blocks.reshape(3, -1)
    theirs = gguf_dequantize(type_name, data)
    assert theirs.shape[0] == 3 and torch.isfinite(theirs).all()
    assert torch.equal(ours(type_name, data, theirs.shape), theirs)


@pytest.mark.parametrize("type_name", FLOATS)
def test_float_types_match_gguf(type_name):
    weights = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    data = encode(type_name, weights, rng=None)
    theirs = gguf_dequantize(type_name, data)
    assert torch.equal(ours(type_name, data, (3, 40)), theirs)


# The largest error of a round trip, as a fraction of max |w|: half a quantisation step, where a
# step is max|w|/8 (Q4_0), /16 (Q5_0), /127 (Q8_0), or (max − min)/15 and /31 (Q4_1, Q5_1);
# a whole step for Q4_0/Q5_0, whose codes stop one short on the positive side.
ROUND_TRIP_ERROR = {"Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16, "Q5_1": 1 / 31, "Q8_0": 1 / 254}


@pytest.mark.parametrize("type_name", GGUF_CAN_QUANTISE)
def test_gguf_quantised_floats_round_trip(type_name):
    weights = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    data = encode(type_name, weights, rng=None)
    got = ours(type_name, data, weights.shape)
    assert torch.equal(got, gguf_dequantize(type_name, data))
    error = (got - torch.from_numpy(weights)).abs().max().item()
    assert error <= 1.1 * ROUND_TRIP_ERROR[type_name] * np.abs(weights).max()


def test_product_does_not_import_the_oracles():
    for file in ("formats/gguf_file.py", "formats/checkpoint.py", "formats/meta_llama2c.py"):
        tree = ast.parse((ROOT / file).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"gguf", "transformers"}, file


# ---------------------------------------------------------------- a small quantised model

SMALL = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=512, vocab_size=64)
# Each supported type at least once; K-quants need rows of a multiple of 256 weights.
SMALL_TYPES = {"token_embd.weight": "Q8_0", "output.weight": "Q6_K",
               "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1",
               "blk.0.attn_v.weight": "Q5_0", "blk.0.attn_output.weight": "Q5_1",
               "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K",
               "blk.0.ffn_down.weight": "Q6_K",
               "blk.1.attn_q.weight": "F16", "blk.1.attn_k.weight": "BF16",
               "blk.1.attn_v.weight": "Q8_0", "blk.1.attn_output.weight": "Q4_K",
               "blk.1.ffn_gate.weight": "Q4_1", "blk.1.ffn_up.weight": "Q5_K",
               "blk.1.ffn_down.weight": "F32"}
OURS = {"token_embd": "embed_tokens", "output": "lm_head", "output_norm": "norm",
        "attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj",
        "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def our_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{OURS[parts[2]]}.weight"
    return f"{OURS[parts[0]]}.weight"


def small_shapes(c=SMALL) -> dict:
    kv = c["n_kv_heads"] * c["dim"] // c["n_heads"]
    shapes = {"token_embd.weight": (c["vocab_size"], c["dim"]),
              "output_norm.weight": (c["dim"],),
              "output.weight": (c["vocab_size"], c["dim"])}
    per_layer = {"attn_norm": (c["dim"],), "attn_q": (c["dim"], c["dim"]),
                 "attn_k": (kv, c["dim"]), "attn_v": (kv, c["dim"]),
                 "attn_output": (c["dim"], c["dim"]), "ffn_norm": (c["dim"],),
                 "ffn_gate": (c["ffn_hidden"], c["dim"]), "ffn_up": (c["ffn_hidden"], c["dim"]),
                 "ffn_down": (c["dim"], c["ffn_hidden"])}
    for layer in range(c["n_layers"]):
        for name, shape in per_layer.items():
            shapes[f"blk.{layer}.{name}.weight"] = shape
    return shapes


def write_small_model(path, types=SMALL_TYPES, rope_freqs=None) -> dict:
    """A GGUF written by gguf.GGUFWriter; returns {our name: the gguf package's dequantisation}."""
    c = SMALL
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c["n_layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(c["dim"])
    writer.add_feed_forward_length(c["ffn_hidden"])
    writer.add_head_count(c["n_heads"])
    writer.add_head_count_kv(c["n_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(c["vocab_size"])
    rng = np.random.default_rng(3)
    expected = {}
    for name, shape in small_shapes().items():
        type_name = types.get(name, "F32")  # norms stay F32, as llama.cpp keeps them
        weights = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if type_name in GGMLType.__members__ and GGMLType[type_name] not in gguf_file.GGML_TYPES:
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[GGMLType[type_name]]
            data = rng.integers(0, 256, (shape[0], shape[1] // block_size * block_bytes),
                                dtype=np.uint8)  # a type we do not read: any bytes will do
        else:
            data = encode(type_name, weights, rng)
            expected[our_name(name)] = gguf_dequantize(type_name, data).reshape(shape)
        raw_dtype = GGMLType[type_name] if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_small_quantised_model_loads(tmp_path):
    path = tmp_path / "small.gguf"
    expected = write_small_model(path)
    model, config = load_checkpoint(path)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (256, 2, 4, 2)
    assert (config.ffn_hidden, config.vocab_size, config.rope_theta) == (512, 64, 500000.0)
    assert not config.tie_embeddings and config.rope_scaling is None
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, weight in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], weight), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_read_gguf_yields_one_float32_tensor_at_a_time(tmp_path):
    path = tmp_path / "small.gguf"
    write_small_model(path)
    _, tensors = gguf_file.read_gguf(path)
    file_name, name, tensor = next(tensors)
    assert (file_name, name) == ("token_embd.weight", "embed_tokens.weight")
    assert tensor.dtype == torch.float32 and tensor.shape == (64, 256)
    assert len(list(tensors)) == len(small_shapes()) - 1


def llama31_rope_factors(head_dim, theta, factor, low=1.0, high=4.0, old_context=8192):
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it for Llama-3.1."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama-3.1, Llama-3.2 1B/3B
def test_llama31_rope_freqs_become_rope_scaling(tmp_path, factor):
    path = tmp_path / "llama31.gguf"
    write_small_model(path, rope_freqs=llama31_rope_factors(64, 500000.0, factor))
    model, config = load_checkpoint(path)  # rope_freqs.weight is not an unexpected tensor
    assert config.rope_scaling == llama3_scaling(factor)


def test_other_rope_freqs_are_refused(tmp_path):
    path = tmp_path / "other_rope.gguf"
    write_small_model(path, rope_freqs=llama31_rope_factors(64, 500000.0, 8.0, old_context=4096))
    with pytest.raises(UserError, match="rope_freqs.weight does not match Llama-3.1"):
        load_checkpoint(path)


# ---------------------------------------------------------------- what cannot be read

@pytest.mark.parametrize("type_name, type_id", [("Q2_K", 10), ("IQ4_XS", 23)])
def test_unsupported_type(tmp_path, type_name, type_id):
    path = tmp_path / "unsupported.gguf"
    write_small_model(path, types={**SMALL_TYPES, "blk.1.ffn_up.weight": type_name})
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{path}: tensor blk.1.ffn_up.weight has ggml type {type_name} "
                       f"(id {type_id}), which cannot be loaded; supported: F32, F16, Q4_0, "
                       "Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16")


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.gguf"
    write_small_model(path)
    last = gguf_file.read_gguf_header(path).tensors[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset + 100)
    with pytest.raises(UserError, match=rf"tensor {last.name} needs bytes up to \d+, but the "
                                        rf"file ends at {last.offset + 100} \(truncated\?\)"):
        load_checkpoint(path)


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct

# A fixed 20-token sequence (any ids will do: the two models must agree on all of them).
SMOLLM2_TOKENS = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_path):
    return load_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_logits_transformers(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(SMOLLM2_TOKENS).logits


def test_smollm2_config(smollm2_ours):
    _, config = smollm2_ours
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.ffn_hidden, config.vocab_size, config.rope_theta) == (1536, 49152, 100000.0)
    assert config.tie_embeddings and config.head_dim == 64 and config.rope_scaling is None
    model, _ = smollm2_ours
    assert model.lm_head.weight is model.embed_tokens.weight


def test_smollm2_logits_match_transformers(smollm2_ours, smollm2_logits_transformers):
    model, _ = smollm2_ours
    with torch.no_grad():
        logits = model.eval()(SMOLLM2_TOKENS)
    assert logits.shape == smollm2_logits_transformers.shape == (1, 20, 49152)
    assert (logits - smollm2_logits_transformers).abs().max().item() <= 1e-4
