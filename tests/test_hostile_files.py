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

from formats import gguf_file
from formats.checkpoint import load_checkpoint, read_checkpoint
from formats.files import read_torch_file
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


def one_line_error_and_peak(call, *args) -> tuple[str, int]:
    """one_line_error(call, *args), and the most bytes Python held while it ran."""
    tracemalloc.start()
    try:
        message = one_line_error(call, *args)
        return message, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


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
    message, peak = one_line_error_and_peak(load_checkpoint, path)
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
    from formats.checkpoint import save_hf_checkpoint
    save_hf_checkpoint(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_tiny_hf_folder_loads(tmp_path):
    _, config = load_checkpoint(hf_folder(tmp_path))
    assert config.n_layers == 1 and config.norm_eps == 1e-5


def test_hf_claim_of_ten_million_layers(tmp_path):
    folder = hf_folder(tmp_path, {**HF_CONFIG, "num_hidden_layers": 10**7})
    message, peak = one_line_error_and_peak(load_checkpoint, folder)
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
    from formats.checkpoint import save_checkpoint
    save_checkpoint(Transformer(ModelConfig(**TINY)), tmp_path)
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({**TINY, "n_layers": 10**7}))
    assert one_line_error(load_checkpoint, tmp_path) == (
        f"{tmp_path}: the config says 10000000 layers, but the file holds 12 tensors, too few "
        "for that (9 per layer)")
    path.write_text(json.dumps({**TINY, "layers": 3}))
    assert one_line_error(load_checkpoint, tmp_path) == (
        f"{path}: not a model config of this project (unknown keys: layers)")


def test_meta_and_llama2c_configs_of_the_wrong_type(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(16, 8)}, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": "1", "n_heads": 2}))
    assert one_line_error(load_checkpoint, meta) == (
        f"{meta / 'params.json'}: n_layers is '1', but it must be a whole number >= 1")
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 10**7, "n_heads": 2}))
    assert one_line_error(load_checkpoint, meta) == (
        f"{meta}: the config says 10000000 layers, but the file holds 1 tensors, too few for "
        "that (9 per layer)")
    state = {"layers.0.feed_forward.w1.weight": torch.zeros(16, 8)}
    args = {"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 16, "norm_eps": "tiny"}
    torch.save({"model": state, "model_args": args}, tmp_path / "ckpt.pt")
    assert one_line_error(load_checkpoint, tmp_path / "ckpt.pt") == (
        f"{tmp_path / 'ckpt.pt'}: norm_eps is 'tiny', but it must be a finite number > 0")


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


# ---------------------------------------------------------------- tokenizers

TOKENS = ["<|endoftext|>", "a", "b", "ab"]


def tokenizer_gguf(tmp_path, tokens=TOKENS, types=(3, 1, 1, 1), merges=("a b",), extra=()):
    types_entry = array("tokenizer.ggml.token_type", I32,
                        np.array(types, np.int32).tobytes(), len(types))
    metadata = [text("tokenizer.ggml.model", "gpt2"), text("tokenizer.ggml.pre", "gpt2"),
                tokens if isinstance(tokens, bytes) else strings("tokenizer.ggml.tokens", tokens),
                types_entry, strings("tokenizer.ggml.merges", list(merges)), *extra]
    return write(tmp_path / "tok.gguf", gguf_bytes(metadata))


def test_the_crafted_gguf_tokenizer_works(tmp_path):
    tokenizer = Tokenizer.from_file(tokenizer_gguf(tmp_path))
    assert tokenizer.encode("ab") == [3] and tokenizer.decode([1, 2]) == "ab"


@pytest.mark.parametrize("change, message", [
    (dict(types=(3, 1)), "tokenizer.ggml.token_type must be an array of integers, one for each "
                         "of the 4 tokens"),
    (dict(merges=("ab",)), "merge 1 is 'ab', not two tokens (\"a b\" or [\"a\", \"b\"])"),
    (dict(merges=("a b c",)), "merge 1 is 'a b c', not two tokens (\"a b\" or [\"a\", \"b\"])"),
    (dict(tokens=array("tokenizer.ggml.tokens", U32, bytes(16), 4)),
     "tokenizer.ggml.tokens is not an array of strings"),
    (dict(extra=[u32("tokenizer.ggml.bos_token_id", 4000)]),
     "the BOS token id 4000 is not a token's id"),
    (dict(tokens=[], types=(), merges=()), "the vocabulary is empty"),
], ids=["short types", "merge without space", "merge of three", "numeric tokens", "bos id",
        "no tokens"])
def test_damaged_gguf_tokenizer(tmp_path, change, message):
    path = tokenizer_gguf(tmp_path, **change)
    assert one_line_error(Tokenizer.from_file, path) == f"{path}: {message}"


TOKENIZER_JSON = {
    "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}],
    "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
    "post_processor": None, "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3},
              "merges": ["a b"]}}


def tokenizer_json(tmp_path, spec):
    path = tmp_path / "tokenizer.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def test_the_crafted_tokenizer_json_works(tmp_path):
    tokenizer = Tokenizer.from_file(tokenizer_json(tmp_path, TOKENIZER_JSON))
    assert tokenizer.encode("ab") == [3]


def with_model(**change):
    return {**TOKENIZER_JSON, "model": {**TOKENIZER_JSON["model"], **change}}


@pytest.mark.parametrize("spec, message", [
    (with_model(merges=[["a", "b", "c"]]),
     "merge 1 is ['a', 'b', 'c'], not two tokens (\"a b\" or [\"a\", \"b\"])"),
    (with_model(merges=[[1, 2]]), "token 1 is not a string"),
    (with_model(merges="a b"), "the merges must be a list, got a string"),
    (with_model(merges=None), "the merges must be a list, got null"),
    ({k: v for k, v in TOKENIZER_JSON.items() if k != "model"},
     "not a tokenizer.json (it has no \"model\" object)"),
    (with_model(vocab={"a": "1"}), "model.vocab must be an object of token → id (a whole number "
                                   ">= 0)"),
    ({**TOKENIZER_JSON, "added_tokens": [{"id": "0", "content": "x"}]},
     "added_tokens must be a list of {\"id\": a whole number >= 0, \"content\": text}"),
    ({**TOKENIZER_JSON, "pre_tokenizer": ["ByteLevel"]},
     "the pre_tokenizer must be null or an object with a \"type\" (and a Sequence a list of "
     "such objects)"),
    ({**TOKENIZER_JSON, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{}]}},
     "the pre_tokenizer must be null or an object with a \"type\" (and a Sequence a list of "
     "such objects)"),
    ('{"a":' * 50_000 + "1" + "}" * 50_000, "not readable JSON (nested too deeply)"),
], ids=["merge of three", "merge of numbers", "merges a string", "no merges", "no model",
        "ids as strings", "added ids as strings", "pre_tokenizer a list", "step without type",
        "deep"])
def test_damaged_tokenizer_json(tmp_path, spec, message):
    path = tokenizer_json(tmp_path, spec)
    assert one_line_error(Tokenizer.from_file, path) == f"{path}: {message}"


# ---------------------------------------------------------------- data files and text

def test_data_nested_too_deeply(tmp_path):
    from records import load_records
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert one_line_error(load_records, deep) == (
        f"{deep}: not valid JSON here (nested too deeply)")
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"instruction": "a", "output": "b"}\n' + '{"a":' * 100_000 + "1"
                     + "}" * 100_000 + "\n")
    assert one_line_error(load_records, lines) == (
        f"{lines}: line 2: not valid JSON here (nested too deeply)")


def test_data_that_is_not_a_regular_file(tmp_path):
    from records import load_records
    assert one_line_error(load_records, "/dev/zero") == (
        "/dev/zero is not a regular file (a device or a pipe); data is a file of records (JSON, "
        "JSON Lines, CSV, TSV or Parquet) or a folder of them")
    assert one_line_error(load_records, tmp_path).startswith(f"{tmp_path} is a folder with no "
                                                             "data file in it")


def test_a_split_that_leaves_no_training_record(tmp_path):
    from records import split_train_val
    records = [{"system": None, "turns": []}]
    assert one_line_error(split_train_val, records, 0.9) == (
        "the data has 1 record and --val-split 0.9 puts it in the validation set, which leaves "
        "none to train on; use --val-split 0, or more records")
    assert split_train_val(records, 0.4) == (records, [])  # rounds to no validation record


def test_text_that_is_not_utf8():
    """A lone surrogate: a JSON escape in a record, or a byte that was not UTF-8 in a command
    line argument (Python decodes it as U+DC80 + byte)."""
    from records import normalize_record
    from tokenizer import ByteTokenizer
    record = {"instruction": "hi", "output": "a\ud800b"}
    assert one_line_error(normalize_record, record, "d.json: record 1") == (
        "d.json: record 1: 'output' is not valid text (character 2 is a lone surrogate, U+D800)")
    assert one_line_error(ByteTokenizer().encode, "caf\udce9") == (
        "the text 'caf\\udce9' cannot be tokenized: character 4 is the byte 0xe9, which is not "
        "UTF-8")


# ---------------------------------------------------------------- numbers at the edges

@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300, 5e-324])
@pytest.mark.parametrize("top_k, top_p", [(None, None), (None, 1e-12), (1, None), (1, 1e-12)])
def test_a_tiny_temperature_picks_the_best_token(temperature, top_k, top_p):
    """logits/T overflows float32 for T below ~1e-38; softmax of inf is nan, and multinomial
    refused it. The best token has all the mass, as T → 0 means."""
    from generate import sample_next
    logits = torch.tensor([1.0, 3.0, 2.0, 2.999])
    generator = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature, top_k, top_p, generator) for _ in range(20)}
    assert picks == {1}


@pytest.mark.parametrize("value", ["-1", str(2**63), str(2**70)])
def test_seeds_beyond_64_bits_are_refused_in_one_line(value):
    from generate import parse_args
    assert one_line_error(parse_args, ["--checkpoint", "x", "--seed", value]) == (
        f"argument --seed: must be an integer in [0, 2**63), got {value}")
    assert parse_args(["--checkpoint", "x", "--seed", str(2**63 - 1)]).seed == 2**63 - 1


# ---------------------------------------------------------------- finding the checkpoint

def test_a_folder_that_holds_a_gguf_is_a_checkpoint(tmp_path):
    """llama.cpp models are often kept in a folder of their own: the folder finds its .gguf,
    and the tokenizer embedded in it."""
    tokenizer_entries = [text("tokenizer.ggml.model", "gpt2"), text("tokenizer.ggml.pre", "gpt2"),
                         strings("tokenizer.ggml.tokens", list("abcdefghijklmnop"))]
    write(tmp_path / "tiny.gguf", gguf_bytes(model_metadata() + tokenizer_entries,
                                             tiny_tensors()))
    (tmp_path / "README.md").write_text("a model")
    _, config = load_checkpoint(tmp_path)
    assert config.vocab_size == 16
    assert checkpoint_tokenizer(tmp_path).encode("dad") == [3, 0, 3]


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B"])
def test_a_hub_name_says_that_nothing_is_downloaded(name):
    message = (f"checkpoint not found: {name}. If it is a Hugging Face Hub name: this project "
               "reads only files on this machine and downloads nothing; download it first "
               f"(huggingface-cli download {name} --local-dir DIR, or git clone "
               f"https://huggingface.co/{name} DIR) and pass that folder")
    assert one_line_error(read_checkpoint, name) == message
    assert one_line_error(checkpoint_tokenizer, name) == message
    assert one_line_error(read_checkpoint, "models/missing.gguf") == (
        "checkpoint not found: models/missing.gguf")
