"""Crafted and damaged input files: each is one line `PATH: what is wrong`, never a traceback, and
no size read from a file makes the reader take more memory or time than the file's own size
warrants. Every file here is built by the test, byte by byte where the format is binary."""
import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gguf_file
from checkpoint import load_checkpoint, read_checkpoint, read_torch_file
from errors import UserError
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, checkpoint_tokenizer


def one_line_error(call, *args) -> str:
    """The message of the UserError that call(*args) raises, checked to be one line."""
    with pytest.raises(UserError) as e:
        call(*args)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---------------------------------------------------------------- GGUF, written byte by byte

U8, U32, I32, F32, BOOL, STRING, ARRAY, U64 = 0, 4, 5, 6, 7, 8, 9, 10
TINY = dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=16, vocab_size=16)


def gguf_string(text) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def entry(key: str, kind: int, payload: bytes) -> bytes:
    """One metadata entry: key, value type, value."""
    return gguf_string(key) + struct.pack("<I", kind) + payload


def u32(key, value):
    return entry(key, U32, struct.pack("<I", value))


def f32(key, value):
    return entry(key, F32, struct.pack("<f", value))


def text(key, value):
    return entry(key, STRING, gguf_string(value))


def array(key, item_kind: int, items: bytes, count: int) -> bytes:
    return entry(key, ARRAY, struct.pack("<IQ", item_kind, count) + items)


def strings(key, values: list) -> bytes:
    return array(key, STRING, b"".join(gguf_string(v) for v in values), len(values))


def model_metadata(n_layers=TINY["n_layers"]) -> list:
    c = TINY
    return [text("general.architecture", "llama"), u32("llama.block_count", n_layers),
            u32("llama.embedding_length", c["dim"]), u32("llama.feed_forward_length",
                                                         c["ffn_hidden"]),
            u32("llama.attention.head_count", c["n_heads"]),
            u32("llama.attention.head_count_kv", c["n_kv_heads"]),
            u32("llama.context_length", 64), u32("llama.vocab_size", c["vocab_size"]),
            f32("llama.attention.layer_norm_rms_epsilon", 1e-5)]


def tiny_tensors() -> dict:
    """{GGUF name: float32 array} of the TINY model (fixed random values)."""
    c = TINY
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (c["vocab_size"], c["dim"]), "output_norm.weight": (c["dim"],),
              "output.weight": (c["vocab_size"], c["dim"])}
    per_layer = {"attn_norm": (c["dim"],), "attn_q": (c["dim"], c["dim"]),
                 "attn_k": (c["dim"], c["dim"]), "attn_v": (c["dim"], c["dim"]),
                 "attn_output": (c["dim"], c["dim"]), "ffn_norm": (c["dim"],),
                 "ffn_gate": (c["ffn_hidden"], c["dim"]), "ffn_up": (c["ffn_hidden"], c["dim"]),
                 "ffn_down": (c["dim"], c["ffn_hidden"])}
    for layer in range(c["n_layers"]):
        shapes.update({f"blk.{layer}.{name}.weight": shape for name, shape in per_layer.items()})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_bytes(metadata: list, tensors: dict | None = None, *, version=3, n_tensors=None,
               n_metadata=None, dims=None, align=32) -> bytes:
    """A GGUF file: header, metadata entries (bytes), tensor table and F32 data. n_tensors,
    n_metadata and dims ({name: dims as stored}) replace what the file says."""
    tensors = tensors or {}
    table, data = b"", b""
    for name, values in tensors.items():
        stored = (dims or {}).get(name, values.shape[::-1])  # innermost first
        table += gguf_string(name) + struct.pack("<I", len(stored))
        table += b"".join(struct.pack("<Q", d) for d in stored)
        table += struct.pack("<IQ", 0, len(data))
        data += values.tobytes() + bytes(-values.nbytes % 32)
    header = b"GGUF" + struct.pack("<IQQ", version,
                                   len(tensors) if n_tensors is None else n_tensors,
                                   len(metadata) if n_metadata is None else n_metadata)
    header += b"".join(metadata) + table
    return header + bytes(-len(header) % align) + data


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_the_crafted_tiny_gguf_loads(tmp_path):
    """The hostile files below each change one thing of this one, which loads."""
    tensors = tiny_tensors()
    path = write(tmp_path / "tiny.gguf", gguf_bytes(model_metadata(), tensors))
    model, config = load_checkpoint(path)
    assert (config.dim, config.n_layers, config.vocab_size) == (8, 1, 16)
    assert torch.equal(model.layers[0].mlp.down_proj.weight,
                       torch.from_numpy(tensors["blk.0.ffn_down.weight"]))


def test_a_claim_of_ten_million_layers_is_one_line_in_bounded_memory(tmp_path):
    path = write(tmp_path / "layers.gguf", gguf_bytes(model_metadata(10**7), tiny_tensors()))
    tracemalloc.start()
    message = one_line_error(load_checkpoint, path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message == (f"{path}: the config says 10000000 layers, but the file holds 12 "
                       "tensors, too few for that (9 per layer)")
    assert peak < 5_000_000  # bytes; a name table for the claimed layers alone took gigabytes


@pytest.mark.parametrize("change, reason", [
    (dict(n_tensors=2**60), "1152921504606846976 tensors cannot fit in the"),
    (dict(n_metadata=2**62), "4611686018427387904 metadata entries cannot fit in the"),
    (dict(version=1), "GGUF version 1; only versions 2 and 3 are read"),
    (dict(dims={"output_norm.weight": (8, 1, 1, 1, 1)}),
     "tensor output_norm.weight has 5 dimensions; ggml allows at most 4"),
])
def test_counts_beyond_the_file(tmp_path, change, reason):
    path = write(tmp_path / "bad.gguf", gguf_bytes(model_metadata(), tiny_tensors(), **change))
    message = one_line_error(load_checkpoint, path)
    assert message.startswith(f"{path}: not a readable GGUF file (") and reason in message


def test_overflowing_dims(tmp_path):
    """Dims whose product overflows 64 bits: the tensor would need more bytes than the file."""
    dims = {"token_embd.weight": (2**63, 2**63)}
    path = write(tmp_path / "dims.gguf", gguf_bytes(model_metadata(), tiny_tensors(), dims=dims))
    message = one_line_error(load_checkpoint, path)
    assert message.startswith(f"{path}: tensor token_embd.weight needs bytes up to ")


@pytest.mark.parametrize("value, shown", [(u32("general.alignment", 0), "0"),
                                          (u32("general.alignment", 48), "48"),
                                          (text("general.alignment", "32"), "'32'")],
                         ids=["zero", "48", "a string"])
def test_alignment_that_is_not_a_power_of_two(tmp_path, value, shown):
    path = write(tmp_path / "align.gguf", gguf_bytes(model_metadata() + [value], tiny_tensors()))
    assert one_line_error(load_checkpoint, path) == (
        f"{path}: not a readable GGUF file (general.alignment is {shown}, not a power of two)")


@pytest.mark.parametrize("entry_bytes, reason", [
    (text("general.name", "x")[:-9] + struct.pack("<Q", 2**64 - 1),
     "the file ends inside general.name (18446744073709551615 bytes needed, "),
    (array("tokenizer.ggml.scores", F32, b"", 2**61), "2305843009213693952 items of "
                                                      "tokenizer.ggml.scores cannot fit"),
    (array("tokenizer.ggml.tokens", STRING, b"", 2**61), "2305843009213693952 items of "
                                                         "tokenizer.ggml.tokens cannot fit"),
    (entry("general.name", 99, b""), "general.name has the unknown value type 99"),
    (array("x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 10 + struct.pack("<IQ", U8, 0), 1),
     "x nests arrays more than 4 deep"),
], ids=["string length", "numeric array count", "string array count", "value type", "nesting"])
def test_metadata_longer_than_the_file(tmp_path, entry_bytes, reason):
    path = write(tmp_path / "meta.gguf", gguf_bytes(model_metadata() + [entry_bytes]))
    message = one_line_error(gguf_file.read_gguf_header, path)
    assert message.startswith(f"{path}: not a readable GGUF file (") and reason in message


@pytest.mark.parametrize("data", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00\x00"],
                         ids=["empty", "magic", "version"])
def test_a_file_that_ends_in_its_header_says_so(tmp_path, data):
    path = write(tmp_path / "short.gguf", data)
    message = one_line_error(load_checkpoint, path)
    assert "()" not in message
    if data:
        assert message.startswith(f"{path}: not a readable GGUF file (the file ends inside ")


def test_a_big_numeric_array_is_read_in_the_memory_and_time_of_its_bytes(tmp_path):
    """20 MB of int32 token types: read as one numpy array, not 5 million Python ints (which
    took ~10× the bytes and seconds)."""
    n = 5_000_000
    types = array("tokenizer.ggml.token_type", I32, np.ones(n, np.int32).tobytes(), n)
    path = write(tmp_path / "big.gguf", gguf_bytes(model_metadata() + [types]))
    tracemalloc.start()
    start = time.perf_counter()
    header = gguf_file.read_gguf_header(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(header.metadata["tokenizer.ggml.token_type"]) == n
    assert int(header.metadata["tokenizer.ggml.token_type"].sum()) == n
    assert peak < 1.5 * 4 * n and seconds < 2


@pytest.mark.parametrize("entry_bytes, message", [
    (u32("llama.block_count", 0), "llama.block_count is 0, but it must be a whole number >= 1"),
    (text("llama.embedding_length", "8"),
     "llama.embedding_length is '8', but it must be a whole number >= 1"),
    (text("llama.attention.layer_norm_rms_epsilon", "abc"),
     "llama.attention.layer_norm_rms_epsilon is 'abc', but it must be a finite number > 0"),
    (f32("llama.rope.freq_base", float("nan")),
     "llama.rope.freq_base is nan, but it must be a finite number > 0"),
], ids=["zero layers", "a string", "eps a string", "nan"])
def test_gguf_config_values_of_the_wrong_type(tmp_path, entry_bytes, message):
    key = entry_bytes[8:8 + struct.unpack("<Q", entry_bytes[:8])[0]].decode()
    metadata = [e for e in model_metadata() if key.encode() not in e] + [entry_bytes]
    path = write(tmp_path / "typed.gguf", gguf_bytes(metadata, tiny_tensors()))
    assert one_line_error(load_checkpoint, path) == f"{path}: {message}"


# ---------------------------------------------------------------- Hugging Face and our own format

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 16,
             "vocab_size": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
             "tie_word_embeddings": False}


def hf_folder(tmp_path, config=HF_CONFIG):
    """A Hugging Face folder of the TINY model (random weights under HF's names)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    from checkpoint import save_hf_checkpoint
    save_hf_checkpoint(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_tiny_hf_folder_loads(tmp_path):
    _, config = load_checkpoint(hf_folder(tmp_path))
    assert config.n_layers == 1 and config.norm_eps == 1e-5


def test_hf_claim_of_ten_million_layers(tmp_path):
    folder = hf_folder(tmp_path, {**HF_CONFIG, "num_hidden_layers": 10**7})
    tracemalloc.start()
    message = one_line_error(load_checkpoint, folder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message == (f"{folder}: the config says 10000000 layers, but the file holds 12 "
                       "tensors, too few for that (9 per layer)")
    assert peak < 5_000_000


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=True), "vocab_size is True, but it must be a whole number >= 1"),
    (dict(rms_norm_eps="abc"), "rms_norm_eps is 'abc', but it must be a finite number > 0"),
    (dict(rope_theta=-1), "rope_theta is -1, but it must be a finite number > 0"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings is 'no', but it must be true or false"),
    (dict(rope_scaling=[1, 2]), "rope_scaling is [1, 2], but it must be an object"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "8", "low_freq_factor": 1,
                        "high_freq_factor": 4, "original_max_position_embeddings": 8192}),
     "factor is '8', but it must be a finite number > 0"),
    (dict(num_attention_heads=3), "model config: dim=8 is not a multiple of n_heads=3 (and no "
                                  "head_dim is given)"),
])
def test_hf_config_values_of_the_wrong_type(tmp_path, change, message):
    folder = hf_folder(tmp_path, {**HF_CONFIG, **change})
    assert one_line_error(load_checkpoint, folder) == f"{folder / 'config.json'}: {message}"


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object {...}, but the file holds an array"),
    ('"llama"', "expected a JSON object {...}, but the file holds a string"),
    ("[" * 100_000 + "]" * 100_000, "not readable JSON (nested too deeply)"),
], ids=["array", "string", "deep"])
def test_a_config_json_that_is_not_an_object(tmp_path, content, message):
    folder = hf_folder(tmp_path)
    (folder / "config.json").write_text(content)
    assert one_line_error(load_checkpoint, folder) == f"{folder / 'config.json'}: {message}"


@pytest.mark.parametrize("index", [{}, {"weight_map": []}, {"weight_map": {"a": 1}}])
def test_an_index_without_a_weight_map(tmp_path, index):
    folder = hf_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert one_line_error(load_checkpoint, folder) == (
        f"{folder / 'model.safetensors.index.json'}: no \"weight_map\" object of tensor name → "
        "shard file name")


def test_our_own_format_with_unknown_keys_or_too_many_layers(tmp_path):
    from checkpoint import save_checkpoint
    save_checkpoint(Transformer(ModelConfig(**TINY)), tmp_path)
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({**TINY, "n_layers": 10**7}))
    assert one_line_error(load_checkpoint, tmp_path) == (
        f"{tmp_path}: the config says 10000000 layers, but the file holds 12 tensors, too few "
        "for that (9 per layer)")
    path.write_text(json.dumps({**TINY, "layers": 3}))
    assert one_line_error(load_checkpoint, tmp_path) == (
        f"{path}: not a model config of this project (unknown keys: layers)")


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (print, ("this ran",))
    torch.save({"model": RunsCode()}, tmp_path / "evil.pt")
    message = one_line_error(read_torch_file, tmp_path / "evil.pt")
    assert message == (f"{tmp_path / 'evil.pt'}: refused: it holds more than tensors and plain "
                       "data, which could run code when loaded (Unsupported global: GLOBAL print "
                       "was not an allowed global by default); this project loads only what "
                       "torch.load(weights_only=True) accepts")


def test_a_torch_file_that_holds_no_dict_of_tensors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "model.pt")
    assert one_line_error(load_checkpoint, tmp_path / "model.pt") == (
        f"{tmp_path / 'model.pt'}: expected a dict saved by torch.save, but it holds list")
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": "not a tensor"}, folder / "pytorch_model.bin")
    assert one_line_error(load_checkpoint, folder) == (
        f"{folder / 'pytorch_model.bin'}: expected a state dict (tensors by name), but it holds "
        "other things")
