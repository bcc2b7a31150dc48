"""llama.cpp's GGUF files: one file holding the config, the tokenizer and the weights.

    "GGUF" magic, version, tensor count, metadata count
    metadata: key (string) → typed value (numbers, strings, arrays), e.g. llama.block_count = 30,
              tokenizer.ggml.tokens = [...], tokenizer.chat_template = "{% for message ... %}"
    tensor table: name, dims (innermost first), ggml type, offset into the data section
    data section (aligned to general.alignment, default 32): the tensors, back to back

Everything is little-endian. This module only reads. The tokenizer loader takes what it needs
from `read_gguf_header`; the model loader (checkpoint.py) calls `read_gguf`, which dequantises
each tensor to float32 as it is read: F32, F16, BF16 and the quantised block formats Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (what Q4_0 ... Q8_0 and Q4_K_M/Q5_K_M/Q6_K files contain).
"""
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from formats.files import REQUIRED, check_layer_count, config_value, model_config, name_map
from errors import UserError
from model import POSITIVE, SIZE, ModelConfig, Rule, llama3_scaling, rope_frequencies

# metadata value types → numpy dtype (8 = string and 9 = array are read separately)
VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
# The fewest bytes an entry can take, to bound a count read from the file by the bytes left:
# a string is its uint64 length then its bytes; an array its item type, uint64 count, items;
# a metadata entry a key (string), a uint32 value type and a value; a tensor's entry a name,
# uint32 n_dims, n_dims uint64 dims, uint32 ggml type, uint64 offset.
MIN_STRING, MIN_ARRAY, MIN_METADATA, MIN_TENSOR = 8, 12, 8 + 4 + 1, 8 + 4 + 4 + 8
MAX_DIMS = 4          # ggml's GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4   # arrays of arrays of ...: more would only be a way to exhaust the stack


@dataclass
class TensorInfo:
    name: str
    shape: tuple      # rows first, as torch lays it out (GGUF lists dims innermost first)
    ggml_type: int    # 0 = F32, 1 = F16, 30 = BF16, others are quantised block formats
    offset: int       # from the start of the file


@dataclass
class GGUFHeader:
    path: Path
    metadata: dict
    tensors: list     # [TensorInfo, ...] in file order


class _Reader:
    """Little-endian values from a binary file, in order. A length or a count read from the file
    is checked against the bytes left in it before anything is read or allocated, so a header
    that claims more than the file holds is an error, not gigabytes of memory. Arrays of numbers
    are read whole (numpy), in the bytes they take in the file."""

    def __init__(self, f, size: int):
        self.f = f
        self.size = size
        self.position = f.tell()  # (kept here: asking the file each time is slow)

    def left(self) -> int:
        return self.size - self.position

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise ValueError(f"the file ends inside {what} ({n} bytes needed, {self.left()} "
                             "left)")
        self.position += n
        return self.f.read(n)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_bytes: int) -> int:
        """A uint64 count of entries that take at least `min_bytes` each."""
        n = self.unpack("<Q", what)
        if n * min_bytes > self.left():
            raise ValueError(f"{n} {what} cannot fit in the {self.size} bytes of the file")
        return n

    def string(self, what: str = "a string") -> str:
        return self.take(self.unpack("<Q", what), what).decode("utf-8", "replace")

    def value(self, kind: int, what: str, depth: int = 0):
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            item_kind = self.unpack("<I", what)
            if item_kind in VALUE_DTYPES:
                dtype = np.dtype(VALUE_DTYPES[item_kind])
                n = self.count(f"items of {what}", dtype.itemsize)
                return np.frombuffer(self.take(n * dtype.itemsize, what), dtype)
            if item_kind == ARRAY and depth == MAX_ARRAY_DEPTH:
                raise ValueError(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            n = self.count(f"items of {what}", MIN_STRING if item_kind == STRING else MIN_ARRAY)
            return [self.value(item_kind, what, depth + 1) for _ in range(n)]
        if kind not in VALUE_DTYPES:
            raise ValueError(f"{what} has the unknown value type {kind}")
        dtype = np.dtype(VALUE_DTYPES[kind])
        return np.frombuffer(self.take(dtype.itemsize, what), dtype)[0].item()


def read_gguf_header(path) -> GGUFHeader:
    """The metadata and the tensor table of a GGUF file (versions 2 and 3 share this layout).
    Arrays of numbers in the metadata come back as numpy arrays, the rest as Python values."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file (bad magic)")
            r = _Reader(f, path.stat().st_size)
            version = r.unpack("<I", "the version")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}; only versions 2 and 3 are read")
            n_tensors = r.unpack("<Q", "the tensor count")
            n_metadata = r.count("metadata entries", MIN_METADATA)
            metadata = {}
            for _ in range(n_metadata):
                key = r.string("a metadata key")
                metadata[key] = r.value(r.unpack("<I", key), key)
            if n_tensors * MIN_TENSOR > r.left():
                raise ValueError(f"{n_tensors} tensors cannot fit in the {r.size} bytes of the "
                                 "file")
            infos = [_tensor_info(r) for _ in range(n_tensors)]
            align = metadata.get("general.alignment", 32)
            if type(align) is not int or align < 1 or align & (align - 1):
                raise ValueError(f"general.alignment is {align!r}, not a power of two")
            data_start = (r.position + align - 1) // align * align
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    for info in infos:
        info.offset += data_start
    return GGUFHeader(path, metadata, infos)


def _tensor_info(r: _Reader) -> TensorInfo:
    name = r.string("a tensor name")
    n_dims = r.unpack("<I", name)
    if n_dims > MAX_DIMS:
        raise ValueError(f"tensor {name} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}")
    dims = [r.unpack("<Q", name) for _ in range(n_dims)]
    ggml_type = r.unpack("<I", name)
    offset = r.unpack("<Q", name)
    return TensorInfo(name, tuple(dims[::-1]), ggml_type, offset)


# ---------------------------------------------------------------- ggml tensor types
#
# A tensor's data is a run of blocks. Quantised formats store `block_size` weights per block in
# `block_bytes` bytes: a few scale fields (fp16) and the packed integer codes q. Each decoder below
# takes every block of one tensor at once, as a (n_blocks, block_bytes) uint8 tensor, and returns
# (n_blocks, block_size) float32 weights. Layouts are ggml's (ggml-common.h, dequantize_row_* in
# ggml-quants.c); all multi-byte fields are little-endian.

def _fp16(field: torch.Tensor) -> torch.Tensor:
    """An fp16 field of every block, (n_blocks, 2) bytes → (n_blocks, 1) float32."""
    return field.contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes → (n, 2k) 4-bit codes: the k low nibbles first, then the k high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits_of_u32(packed: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 → its (n, 32) bits, bit i = bit i%8 of byte i//8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed[:, :, None] >> shifts) & 1).reshape(len(packed), 32)


def dequantize_f32(blocks):
    """F32: 1 weight per block, 4 bytes."""
    return blocks.contiguous().view(torch.float32)


def dequantize_f16(blocks):
    """F16: 1 weight per block, 2 bytes (IEEE half)."""
    return blocks.contiguous().view(torch.float16).float()


def dequantize_bf16(blocks):
    """BF16: 1 weight per block, 2 bytes (the top half of a float32)."""
    return blocks.contiguous().view(torch.bfloat16).float()


def dequantize_q4_0(blocks):
    """Q4_0: 32 weights per block, 18 bytes = fp16 d, 16 bytes of 4-bit codes.
    w = d·(q − 8); low nibbles are weights 0..15, high nibbles 16..31."""
    d = _fp16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 2:18]).float()
    return d * (q - 8)


def dequantize_q4_1(blocks):
    """Q4_1: 32 weights per block, 20 bytes = fp16 d, fp16 m, 16 bytes of 4-bit codes.
    w = d·q + m; low nibbles are weights 0..15, high nibbles 16..31."""
    d = _fp16(blocks[:, 0:2])
    m = _fp16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:20]).float()
    return d * q + m


def dequantize_q5_0(blocks):
    """Q5_0: 32 weights per block, 22 bytes = fp16 d, uint32 qh (the 5th bit of weight i is bit
    i), 16 bytes of the low 4 bits (nibbles as in Q4_0). w = d·(q − 16), q = low | high << 4."""
    d = _fp16(blocks[:, 0:2])
    high = _bits_of_u32(blocks[:, 2:6])
    low = _nibbles(blocks[:, 6:22])
    q = (low | (high << 4)).float()
    return d * (q - 16)


def dequantize_q5_1(blocks):
    """Q5_1: 32 weights per block, 24 bytes = fp16 d, fp16 m, uint32 qh (5th bits), 16 bytes of
    the low 4 bits. w = d·q + m, q = low | high << 4 (bits as in Q5_0)."""
    d = _fp16(blocks[:, 0:2])
    m = _fp16(blocks[:, 2:4])
    high = _bits_of_u32(blocks[:, 4:8])
    low = _nibbles(blocks[:, 8:24])
    q = (low | (high << 4)).float()
    return d * q + m


def dequantize_q8_0(blocks):
    """Q8_0: 32 weights per block, 34 bytes = fp16 d, 32 int8 codes. w = d·q."""
    d = _fp16(blocks[:, 0:2])
    q = blocks[:, 2:34].view(torch.int8).float()
    return d * q


def _k_scales_and_mins(packed: torch.Tensor):
    """The 6-bit scale and min of each of the 8 sub-blocks of a Q4_K/Q5_K block, in 12 bytes:
        bytes 0..3   low 6 bits: scales 0..3;  top 2 bits: the top bits of scales 4..7
        bytes 4..7   low 6 bits: mins 0..3;    top 2 bits: the top bits of mins 4..7
        bytes 8..11  low nibble: the low 4 bits of scales 4..7; high nibble: of mins 4..7
    Returns two (n_blocks, 8) float32 tensors."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 63, (third & 0x0F) | ((first >> 6) << 4)], dim=1)
    mins = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_low_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 128 code bytes of a Q4_K/Q5_K block → (n_blocks, 8, 32) 4-bit codes per sub-block:
    4 chunks of 32 bytes; chunk c holds sub-block 2c in its low and 2c+1 in its high nibbles."""
    chunks = packed.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def dequantize_q4_k(blocks):
    """Q4_K: 256 weights per block in 8 sub-blocks of 32, 144 bytes = fp16 d, fp16 dmin,
    12 bytes of 6-bit (scale, min) per sub-block, 128 bytes of 4-bit codes.
    w = d·scale_s·q − dmin·min_s for sub-block s."""
    d = _fp16(blocks[:, 0:2])
    dmin = _fp16(blocks[:, 2:4])
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:144]).float()
    w = (d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]
    return w.reshape(-1, 256)


def dequantize_q5_k(blocks):
    """Q5_K: 256 weights per block in 8 sub-blocks of 32, 176 bytes = fp16 d, fp16 dmin,
    12 bytes of 6-bit (scale, min) as in Q4_K, 32 bytes qh, 128 bytes of low 4 bits as in Q4_K.
    The 5th bit of weight l of sub-block s is bit s of qh[l].
    w = d·scale_s·q − dmin·min_s, q = low | high << 4."""
    d = _fp16(blocks[:, 0:2])
    dmin = _fp16(blocks[:, 2:4])
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    shifts = torch.arange(8, dtype=torch.uint8)[:, None]
    high = (blocks[:, None, 16:48] >> shifts) & 1
    low = _k_low_nibbles(blocks[:, 48:176])
    q = (low | (high << 4)).float()
    w = (d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]
    return w.reshape(-1, 256)


def dequantize_q6_k(blocks):
    """Q6_K: 256 weights per block in 16 groups of 16, 210 bytes = 128 bytes ql (low 4 bits),
    64 bytes qh (high 2 bits), 16 int8 scales (one per group), fp16 d. w = d·scale_g·(q − 32),
    q = low | high << 4. Each half of 128 weights uses 64 bytes of ql and 32 of qh; its 4 runs
    of 32 weights r = 0..3 take their low bits from ql[32·(r%2) : +32] (low nibbles for r < 2,
    high for r ≥ 2) and their high bits from bits 2r, 2r+1 of qh[0:32]."""
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).float().reshape(-1, 16, 16)
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = _fp16(blocks[:, 208:210])
    w = (d * scales)[:, :, None] * (q - 32)
    return w.reshape(-1, 256)


@dataclass
class GGMLType:
    name: str
    block_size: int    # weights per block
    block_bytes: int   # bytes per block
    dequantize: Callable[[torch.Tensor], torch.Tensor]


GGML_TYPES = {  # ggml type id → how to read it (ids from ggml.h)
    0: GGMLType("F32", 1, 4, dequantize_f32),
    1: GGMLType("F16", 1, 2, dequantize_f16),
    2: GGMLType("Q4_0", 32, 18, dequantize_q4_0),
    3: GGMLType("Q4_1", 32, 20, dequantize_q4_1),
    6: GGMLType("Q5_0", 32, 22, dequantize_q5_0),
    7: GGMLType("Q5_1", 32, 24, dequantize_q5_1),
    8: GGMLType("Q8_0", 32, 34, dequantize_q8_0),
    12: GGMLType("Q4_K", 256, 144, dequantize_q4_k),
    13: GGMLType("Q5_K", 256, 176, dequantize_q5_k),
    14: GGMLType("Q6_K", 256, 210, dequantize_q6_k),
    30: GGMLType("BF16", 1, 2, dequantize_bf16),
}
# The other ids, only to name them in an error message.
OTHER_TYPE_NAMES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def dequantize(data: torch.Tensor, ggml_type: int, shape: tuple) -> torch.Tensor:
    """The float32 tensor of `shape` stored in `data` (uint8, exactly its bytes) as `ggml_type`."""
    kind = GGML_TYPES[ggml_type]
    blocks = data.reshape(-1, kind.block_bytes)
    return kind.dequantize(blocks).reshape(shape)


def tensor_bytes(info: TensorInfo) -> int:
    """How many bytes a tensor of a supported type takes in the data section."""
    kind = GGML_TYPES[info.ggml_type]
    return math.prod(info.shape) // kind.block_size * kind.block_bytes


def _type_name(ggml_type: int) -> str:
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type].name
    return OTHER_TYPE_NAMES.get(ggml_type, "unknown")


def check_tensor(path: Path, info: TensorInfo, file_size: int):
    """A UserError unless the tensor has a type we read, whole blocks, and all its bytes."""
    if info.ggml_type not in GGML_TYPES:
        supported = ", ".join(kind.name for kind in GGML_TYPES.values())
        raise UserError(f"{path}: tensor {info.name} has ggml type {_type_name(info.ggml_type)} "
                        f"(id {info.ggml_type}), which cannot be loaded; supported: {supported}")
    kind = GGML_TYPES[info.ggml_type]
    row = info.shape[-1] if info.shape else 1
    if row % kind.block_size:
        raise UserError(f"{path}: tensor {info.name} has rows of {row} weights, not a whole "
                        f"number of {kind.name} blocks of {kind.block_size}")
    end = info.offset + tensor_bytes(info)
    if end > file_size:
        raise UserError(f"{path}: tensor {info.name} needs bytes up to {end}, but the file ends "
                        f"at {file_size} (truncated?)")


# ---------------------------------------------------------------- the model

GGUF_NAMES = {  # ours: llama.cpp's
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_PREFIX = "blk.{}."
GGUF_LAYER_NAMES = {  # ours: llama.cpp's, within one block
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
}


def _llama_value(header: GGUFHeader, key: str, rule: Rule, default=REQUIRED):
    return config_value(header.metadata, f"llama.{key}", header.path, rule, default)


def _rope_scaling(header: GGUFHeader, config: ModelConfig):
    """Llama-3.1+ GGUFs keep no rope-scaling metadata: llama.cpp's converter stores the result,
    one factor per frequency (each θ_i is divided by it), as the tensor rope_freqs.weight. We
    recover `factor` as the largest (the long waves get exactly it), assume Meta's other
    constants (`llama3_scaling`), and check that this reproduces every stored factor."""
    info = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    if info is None:
        return None
    wrong = UserError(f"{header.path}: rope_freqs.weight does not match Llama-3.1 rope scaling "
                      "with Meta's constants (low/high frequency factors 1 and 4, original "
                      "context 8192); it cannot be loaded")
    if info.shape != (config.head_dim // 2,):  # (before anything of head_dim's size is made)
        raise wrong
    stored = read_tensor(header, info)
    scaling = llama3_scaling(stored.max().item())
    unscaled = rope_frequencies(config)
    scaled = rope_frequencies(replace(config, rope_scaling=scaling))
    if not torch.allclose(unscaled / scaled, stored, rtol=1e-5):
        raise wrong
    return scaling


def read_config(header: GGUFHeader) -> ModelConfig:
    """Our ModelConfig from the `llama.*` metadata keys."""
    path = header.path
    metadata = header.metadata
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise UserError(f"{path}: GGUF architecture {architecture!r}, expected 'llama'")
    if metadata.get("llama.expert_count", 0):
        raise UserError(f"{path}: a mixture-of-experts model (llama.expert_count > 0); "
                        "only dense Llama models can be loaded")
    scaling_type = metadata.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise UserError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    tensor_names = {info.name for info in header.tensors}
    dim = _llama_value(header, "embedding_length", SIZE)
    n_layers = _llama_value(header, "block_count", SIZE)
    n_heads = _llama_value(header, "attention.head_count", SIZE)
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    vocab_size = len(tokens) or _llama_value(header, "vocab_size", SIZE)
    config = model_config(
        path, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=_llama_value(header, "attention.head_count_kv", SIZE, n_heads),
        ffn_hidden=_llama_value(header, "feed_forward_length", SIZE),
        vocab_size=vocab_size,
        norm_eps=_llama_value(header, "attention.layer_norm_rms_epsilon", POSITIVE, 1e-5),
        rope_theta=_llama_value(header, "rope.freq_base", POSITIVE, 10000.0),
        max_seq_len=_llama_value(header, "context_length", SIZE, 2048),
        tie_embeddings="output.weight" not in tensor_names,  # llama.cpp then reuses token_embd
        head_dim=_llama_value(header, "attention.key_length", SIZE, None),
    )
    rope_dims = _llama_value(header, "rope.dimension_count", SIZE, config.head_dim)
    if rope_dims != config.head_dim:
        raise UserError(f"{path}: RoPE on {rope_dims} of {config.head_dim} channels per head "
                        "(partial rotary) is not supported")
    config.rope_scaling = _rope_scaling(header, config)
    return config


def read_tensor(header: GGUFHeader, info: TensorInfo) -> torch.Tensor:
    """One tensor of the file as float32, read and dequantised on its own."""
    check_tensor(header.path, info, header.path.stat().st_size)
    with open(header.path, "rb") as f:
        f.seek(info.offset)
        data = bytearray(f.read(tensor_bytes(info)))
    return dequantize(torch.frombuffer(data, dtype=torch.uint8), info.ggml_type, info.shape)


def read_gguf(path):
    """(ModelConfig, iterator of (name in the file, our name, float32 tensor)), like the readers
    of checkpoint.py and formats.py. Tensors are read and dequantised one at a time as the
    iterator is advanced, so loading needs memory for the model plus one tensor. llama.cpp's
    converter already stores q/k rows in Meta's pair order, which our model uses: no
    permutation."""
    header = read_gguf_header(path)
    file_size = header.path.stat().st_size
    for info in header.tensors:  # fail now, before any loading, on a type or size we cannot read
        check_tensor(header.path, info, file_size)
    config = read_config(header)
    check_layer_count(header.path, config, len(header.tensors))
    names = name_map(GGUF_NAMES, GGUF_LAYER_NAMES, GGUF_LAYER_PREFIX, config.n_layers)

    def tensors():
        for info in header.tensors:
            if info.name == "rope_freqs.weight":
                continue  # already in config.rope_scaling
            yield info.name, names.get(info.name, info.name), read_tensor(header, info)
    return config, tensors()
