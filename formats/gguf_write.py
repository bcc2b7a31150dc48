"""Writing a GGUF file that llama.cpp (and Ollama, LM Studio, transformers) load like their own.

The layout is formats/gguf_file.py's, written in the same order:

    "GGUF", version 3, tensor count, metadata count
    metadata: key, value type, value     (the type of every key we write: KEY_TYPES)
    tensor table: name, dims (innermost first), ggml type, offset in the data section
    padding to general.alignment (32), then each tensor's bytes, each at a multiple of 32

The table comes first, so every tensor's type and size must be known before any data: shapes follow
from the config and types from `tensor_type`, so `write_gguf` writes the header, then puts each
tensor at its offset as it arrives (in any order), quantised on its own. Memory: one tensor.

Names and row order are llama.cpp's (gguf_file.GGUF_NAMES): our q/k rows are already in Meta's
pair order, which llama.cpp's converter also stores, so unlike the Hugging Face export nothing is
permuted. The tokenizer and the chat template go into `tokenizer.*` keys (`tokenizer_metadata`).
"""
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from formats.files import atomic_write
from errors import UserError
from formats.gguf_file import (ARRAY, GGML_TYPES, GGUF_LAYER_NAMES, GGUF_LAYER_PREFIX, GGUF_NAMES,
                               STRING, VALUE_DTYPES)
from formats.gguf_quant import TYPE_IDS, quantized_parts
from model import ModelConfig, rope_frequencies

GGUF_VERSION = 3
ALIGNMENT = 32  # gguf_file reads general.alignment with this default; we never write another
UINT32, INT32, FLOAT32, BOOL = 4, 5, 6, 7  # metadata value types (gguf_file.VALUE_DTYPES)

KEY_TYPES = {  # every key we write → its value type; arrays as (ARRAY, item type)
    "general.architecture": STRING, "general.name": STRING, "general.file_type": UINT32,
    "general.quantization_version": UINT32,
    "llama.context_length": UINT32, "llama.embedding_length": UINT32,
    "llama.block_count": UINT32, "llama.feed_forward_length": UINT32,
    "llama.attention.head_count": UINT32, "llama.attention.head_count_kv": UINT32,
    "llama.attention.key_length": UINT32, "llama.attention.value_length": UINT32,
    "llama.attention.layer_norm_rms_epsilon": FLOAT32, "llama.rope.freq_base": FLOAT32,
    "llama.rope.dimension_count": UINT32, "llama.vocab_size": UINT32,
    "tokenizer.ggml.model": STRING, "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.tokens": (ARRAY, STRING), "tokenizer.ggml.scores": (ARRAY, FLOAT32),
    "tokenizer.ggml.token_type": (ARRAY, INT32), "tokenizer.ggml.merges": (ARRAY, STRING),
    "tokenizer.ggml.bos_token_id": UINT32, "tokenizer.ggml.eos_token_id": UINT32,
    "tokenizer.ggml.eot_token_id": UINT32, "tokenizer.ggml.unknown_token_id": UINT32,
    "tokenizer.ggml.padding_token_id": UINT32, "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.add_eos_token": BOOL, "tokenizer.ggml.add_space_prefix": BOOL,
    "tokenizer.chat_template": STRING,
}

# --type → llama.cpp's file type (llama_ftype, written as general.file_type) and the ggml type of
# the 2-D weights before tensor_type's rules; 1-D tensors (the norms) always stay F32.
FILE_TYPES = {"f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"),
              "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q4_k_m": (15, "Q4_K")}
QUANTIZED = ("q8_0", "q4_0", "q4_1", "q4_k_m")  # llama-quantize's choices apply to these
# llama.cpp's tensor_type_fallback: a row that is not a whole number of 256-weight blocks
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


# ---------------------------------------------------------------- which type for which tensor

def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third in
    between, get a bigger type in Q4_K_M (the layers where quantisation error costs most)."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def tensor_type(name: str, shape: tuple, file_type: str, config: ModelConfig) -> int:
    """The ggml type id of one tensor, as convert_hf_to_gguf.py (f32/f16/bf16/q8_0) and
    llama-quantize (q4_0/q4_1/q4_k_m, from llama-quant.cpp's llama_tensor_get_type) choose it:

    - 1-D tensors (norms, rope_freqs): F32.
    - output.weight, or token_embd.weight when the model ties them: Q6_K in every quantised type
      but q8_0 (the head's error hits every logit), Q8_0 if its rows are not 256-blocks.
    - q4_k_m: attn_v and ffn_down get Q6_K in the layers `more_bits` picks, all else Q4_K.
    - a row that is not a whole number of blocks: Q4_K → Q5_0, Q6_K → Q8_0, else F16.
    """
    if len(shape) < 2:
        return TYPE_IDS["F32"]
    kind = FILE_TYPES[file_type][1]
    columns = shape[-1]
    tied_head = config.tie_embeddings and name == "token_embd.weight"
    is_head = name == "output.weight" or tied_head
    if file_type in QUANTIZED and is_head and kind != "Q8_0":
        kind = "Q6_K" if columns % 256 == 0 else "Q8_0"
    elif file_type == "q4_k_m" and name.startswith("blk."):
        layer = int(name.split(".")[1])
        sensitive = name.endswith(("attn_v.weight", "ffn_down.weight"))
        if sensitive and more_bits(layer, config.n_layers):
            kind = "Q6_K"
    if columns % GGML_TYPES[TYPE_IDS[kind]].block_size:
        kind = FALLBACK.get(kind, "F16")
        if columns % GGML_TYPES[TYPE_IDS[kind]].block_size:
            kind = "F16"
    return TYPE_IDS[kind]


# ---------------------------------------------------------------- what goes into the file

def gguf_names(config: ModelConfig) -> dict:
    """{our name: llama.cpp's} for every tensor of the model, in the order they are written."""
    names = {"embed_tokens.weight": GGUF_NAMES["embed_tokens.weight"]}
    for layer in range(config.n_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            names[f"layers.{layer}.{ours}"] = GGUF_LAYER_PREFIX.format(layer) + theirs
    names["norm.weight"] = GGUF_NAMES["norm.weight"]
    if not config.tie_embeddings:  # llama.cpp reuses token_embd when there is no output.weight
        names["lm_head.weight"] = GGUF_NAMES["lm_head.weight"]
    return names


def tensor_plan(config: ModelConfig, file_type: str) -> list:
    """[(name in the file, shape, ggml type id)] of every tensor, in file order. A Llama-3.1
    model adds rope_freqs.weight: one factor per frequency, by which llama.cpp divides θ_i
    (what its converter writes; gguf_file._rope_scaling reads it back)."""
    c = config
    shapes = {"embed_tokens.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,),
              "lm_head.weight": (c.vocab_size, c.dim)}
    layer_shapes = {"attn_norm.weight": (c.dim,), "mlp_norm.weight": (c.dim,),
                    "attn.q_proj.weight": (c.n_heads * c.head_dim, c.dim),
                    "attn.k_proj.weight": (c.n_kv_heads * c.head_dim, c.dim),
                    "attn.v_proj.weight": (c.n_kv_heads * c.head_dim, c.dim),
                    "attn.o_proj.weight": (c.dim, c.n_heads * c.head_dim),
                    "mlp.gate_proj.weight": (c.ffn_hidden, c.dim),
                    "mlp.up_proj.weight": (c.ffn_hidden, c.dim),
                    "mlp.down_proj.weight": (c.dim, c.ffn_hidden)}
    plan = []
    for ours, theirs in gguf_names(config).items():
        shape = shapes.get(ours) or layer_shapes[ours.split(".", 2)[2]]
        plan.append((theirs, shape, tensor_type(theirs, shape, file_type, c)))
    if c.rope_scaling:
        plan.insert(1, ("rope_freqs.weight", (c.head_dim // 2,), TYPE_IDS["F32"]))
    return plan


def rope_factors(config: ModelConfig) -> torch.Tensor:
    """θ_i without scaling / θ_i with it: what llama.cpp's rope_freqs.weight holds."""
    return rope_frequencies(replace(config, rope_scaling=None)) / rope_frequencies(config)


def model_metadata(config: ModelConfig, file_type: str, name: str) -> dict:
    """The general.* and llama.* keys: the architecture, the shapes, RoPE and the norm."""
    c = config
    metadata = {"general.architecture": "llama", "general.name": name,
                "general.file_type": FILE_TYPES[file_type][0],
                "general.quantization_version": 2,  # ggml's current block layouts
                "llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim,
                "llama.block_count": c.n_layers, "llama.feed_forward_length": c.ffn_hidden,
                "llama.attention.head_count": c.n_heads,
                "llama.attention.head_count_kv": c.n_kv_heads,
                "llama.attention.layer_norm_rms_epsilon": c.norm_eps,
                "llama.rope.freq_base": c.rope_theta, "llama.rope.dimension_count": c.head_dim,
                "llama.vocab_size": c.vocab_size}
    if c.head_dim != c.dim // c.n_heads:
        metadata["llama.attention.key_length"] = c.head_dim
        metadata["llama.attention.value_length"] = c.head_dim
    return metadata


# ---------------------------------------------------------------- bytes

def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(kind, value) -> bytes:
    if kind == STRING:
        return _string(value)
    if isinstance(kind, tuple):  # (ARRAY, item type)
        item = kind[1]
        head = struct.pack("<IQ", item, len(value))
        if item == STRING:
            return head + b"".join(_string(v) for v in value)
        return head + np.asarray(value, dtype=VALUE_DTYPES[item]).tobytes()
    return np.asarray(value, dtype=VALUE_DTYPES[kind]).tobytes()  # the reader's dtypes


def header_bytes(metadata: dict, plan: list) -> tuple[bytes, list]:
    """The header up to the data section (padded), and each tensor's offset within the data."""
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(plan), len(metadata))]
    for key, value in metadata.items():
        kind = KEY_TYPES[key]
        type_id = ARRAY if isinstance(kind, tuple) else kind
        parts += [_string(key), struct.pack("<I", type_id), _value(kind, value)]
    offsets = []
    offset = 0
    for name, shape, type_id in plan:
        offsets.append(offset)
        dims = shape[::-1]  # innermost first
        parts += [_string(name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id,
                                             offset)]
        offset = _aligned(offset + _size(shape, type_id))
    header = b"".join(parts)
    return header + bytes(_aligned(len(header)) - len(header)), offsets


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _size(shape: tuple, type_id: int) -> int:
    kind = GGML_TYPES[type_id]
    n = 1
    for dim in shape:
        n *= dim
    return n // kind.block_size * kind.block_bytes


def write_gguf(path, metadata: dict, plan: list, tensors):
    """Write the file at `path` atomically (checkpoint.atomic_write: a failure, a full disk
    included, leaves no file under that name). `tensors` yields (name in the file, float
    tensor) in any order; each is quantised to its planned type and written at its offset.
    Every planned tensor must come exactly once."""
    header, offsets = header_bytes(metadata, plan)
    where = {name: (len(header) + offset, shape, type_id)
             for (name, shape, type_id), offset in zip(plan, offsets)}
    total = len(header) + offsets[-1] + _size(plan[-1][1], plan[-1][2])

    def write(tmp):
        written = set()
        with open(tmp, "wb") as f:
            f.write(header)
            for name, t in tensors:
                if name not in where or name in written:
                    raise ValueError(f"tensor {name} is not in the plan, or came twice")
                start, shape, type_id = where[name]
                if tuple(t.shape) != tuple(shape):
                    raise UserError(f"tensor {name} has shape {tuple(t.shape)}, but the config "
                                    f"expects {tuple(shape)}")
                f.seek(start)
                for part in quantized_parts(t, type_id):  # (no whole copy of t in float32)
                    f.write(part.numpy())
                written.add(name)
            missing = [name for name in where if name not in written]
            if missing:
                raise UserError(f"the checkpoint lacks {len(missing)} tensors for {path} "
                                f"(e.g. {missing[0]})")
            f.truncate(total)
    atomic_write(path, write)


# ---------------------------------------------------------------- the tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # token_type values


def tokenizer_metadata(tokenizer, chat_template: str | None, end_id: int | None) -> dict:
    """The tokenizer.* keys llama.cpp reads: the vocabulary (tokens, and scores or merges),
    each token's type, the special ids, whether prompts start with BOS, the pre-tokenizer's name,
    and the chat template. `end_id`: the end-of-turn token of the template (written as
    eot_token_id when it is not EOS, so every consumer stops there)."""
    from tokenizer import BPETokenizer
    from tokenizer import SentencePieceTokenizer, TiktokenTokenizer
    if isinstance(tokenizer, BPETokenizer) and _is_gguf(tokenizer.path):
        metadata = _gguf_tokenizer_keys(tokenizer.path)
    elif isinstance(tokenizer, BPETokenizer):
        metadata = _bpe_keys(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        metadata = _sentencepiece_keys(tokenizer)
    elif isinstance(tokenizer, TiktokenTokenizer):
        metadata = _tiktoken_keys(tokenizer)
    else:
        raise UserError(f"tokenizer {tokenizer.path.name} has no GGUF form (the built-in demo's "
                        "byte tokenizer): export a model trained from a real checkpoint")
    if chat_template:
        metadata["tokenizer.chat_template"] = chat_template
    if end_id is not None and end_id != tokenizer.eos_id:
        metadata["tokenizer.ggml.eot_token_id"] = end_id
    return metadata


def _is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf"


def _gguf_tokenizer_keys(path: Path) -> dict:
    """A tokenizer read from a GGUF file: its own keys, unchanged (we write every key that
    llama.cpp's converter writes for one)."""
    from formats.gguf_file import read_gguf_header
    return {k: v for k, v in read_gguf_header(path).metadata.items() if k in KEY_TYPES
            and k.startswith("tokenizer.")}


def _special_ids(tokenizer) -> dict:
    ids = {"tokenizer.ggml.bos_token_id": tokenizer.bos_id,
           "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
           "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos)}
    return {k: v for k, v in ids.items() if v is not None}


def _sentencepiece_keys(tokenizer) -> dict:
    """SentencePiece ("llama" in llama.cpp): every piece with its score and type."""
    sp = tokenizer.sp
    n = sp.vocab_size()
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
             else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL
             for i in range(n)]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
                "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
                "tokenizer.ggml.token_type": types, **_special_ids(tokenizer)}
    if sp.unk_id() >= 0:
        metadata["tokenizer.ggml.unknown_token_id"] = sp.unk_id()
    return metadata


def _bpe_keys(tokenizer) -> dict:
    """Byte-level BPE ("gpt2"): tokens in GPT-2's printable spelling, merges as "left right",
    special tokens as CONTROL, and the pre-tokenizer by llama.cpp's name for its pattern."""
    from formats.bpe import GGUF_PRE_PATTERNS, gpt2_token_text
    pre = next(name for name, pattern in GGUF_PRE_PATTERNS.items()
               if pattern == tokenizer.pattern)
    tokens = {i: gpt2_token_text(token) for token, i in tokenizer.vocab.items()}
    tokens.update({i: text for text, i in tokenizer.special.items()})
    return _bpe_metadata(tokenizer, tokens, set(tokenizer.special.values()), tokenizer.merges, pre)


def _tiktoken_keys(tokenizer) -> dict:
    """Llama-3's tiktoken ranks as byte-level BPE ("gpt2", pre-tokenizer "llama-bpe"). A rank
    file has no merge list: `tiktoken_merges` makes one."""
    from formats.bpe import gpt2_token_text
    ranks = tokenizer.enc._mergeable_ranks
    tokens = {rank: gpt2_token_text(token) for token, rank in ranks.items()}
    tokens.update({i: text for text, i in tokenizer.special.items()})
    return _bpe_metadata(tokenizer, tokens, set(tokenizer.special.values()),
                         tiktoken_merges(ranks), "llama-bpe")


def _bpe_metadata(tokenizer, tokens: dict, special: set, merges: list, pre: str) -> dict:
    from formats.bpe import gpt2_token_text
    n = max(tokens) + 1
    if len(tokens) != n:
        raise UserError(f"tokenizer {tokenizer.path.name}: its ids are not 0..{n - 1} without "
                        "gaps, which GGUF's token list needs")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": [tokens[i] for i in range(n)],
            "tokenizer.ggml.token_type": [CONTROL if i in special else NORMAL for i in range(n)],
            "tokenizer.ggml.merges": [f"{gpt2_token_text(left)} {gpt2_token_text(right)}"
                                      for left, right in merges],
            **_special_ids(tokenizer)}


def tiktoken_merges(ranks: dict) -> list:
    """[(left, right)] for a merge-based BPE that tokenizes as tiktoken does. tiktoken joins the
    adjacent pair whose concatenation has the lowest rank, so every split of a token into two
    tokens is a merge, ranked by the token it makes (then by its parts' ranks), as Hugging Face's
    converter lists them (TikTokenConverter)."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[left], ranks[right], left, right) for left, right in splits]
    return [(left, right) for *_, left, right in sorted(merges)]
