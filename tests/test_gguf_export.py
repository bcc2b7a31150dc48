"""GGUF export (export.py --gguf, gguf_write.py, gguf_quant.py, modelfile.py), and that every
export runs in its consumer: the file read back by our reader and by transformers' GGUF loader
with the source's logits, the quantisers against the gguf package (llama.cpp's own Python
library), the end tokens where transformers, llama.cpp and Ollama read them, and PEFT loading
the adapter by itself."""
import json
import shutil
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

import export
from formats import gguf_file
from formats import gguf_quant
from formats import gguf_write
from formats.checkpoint import load_checkpoint, save_checkpoint
from conftest import shared_path
from formats.adapter import SHAPE_FIELDS, load_adapter, save_adapter
from lora import apply_lora, merge_lora
from model import ModelConfig, Transformer, llama3_scaling
from tokenizer import Tokenizer

# the gguf package quantises these itself (Q8_0 "bit-exact with the reference implementation")
EXACT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "BF16"]


def weights(n_blocks: int, seed=0) -> torch.Tensor:
    """Blocks of 256 with the cases that trip a quantiser: an all-zero block, a constant one, a
    block of one sign, outliers, and Gaussian weights of varied scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 256, generator=g) * torch.rand(n_blocks, 1, generator=g) * 0.1
    x[0] = 0
    x[1] = 0.02
    x[2] = x[2].abs()
    x[3, ::37] *= 40
    return x.reshape(-1)


def gguf_bytes(x: torch.Tensor, type_name: str) -> np.ndarray:
    """The gguf package's quantisation of x, as bytes."""
    data = gguf.quants.quantize(x.numpy().reshape(-1, 256), GGMLType[type_name])
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("type_name", EXACT)
def test_quantisers_match_the_gguf_package_bit_for_bit(type_name):
    x = weights(64)
    ours = gguf_quant.quantize(x, gguf_quant.TYPE_IDS[type_name]).numpy()
    assert np.array_equal(ours, gguf_bytes(x, type_name))


def rms_error(x: torch.Tensor, type_name: str) -> float:
    """Relative RMS error of quantising x, decoded by the gguf package."""
    data = gguf_quant.quantize(x, gguf_quant.TYPE_IDS[type_name]).numpy()
    back = gguf.quants.dequantize(data.reshape(-1, len(data) // (len(x) // 256)),
                                  GGMLType[type_name])
    back = torch.from_numpy(np.ascontiguousarray(back)).reshape(-1)
    return ((back - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_k_quants_decode_alike_in_the_gguf_package_and_ours(type_name):
    """The gguf package cannot make K-quants, only read them: our blocks decode to the same
    floats in both readers, bit for bit, so the layout is llama.cpp's."""
    x = weights(64)
    type_id = gguf_quant.TYPE_IDS[type_name]
    data = gguf_quant.quantize(x, type_id)
    theirs = gguf.quants.dequantize(data.numpy().reshape(64, -1), GGMLType[type_name])
    ours = gguf_file.dequantize(data, type_id, (64, 256))
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs)))


def test_k_quants_errors_sit_where_their_bits_put_them():
    """With no reference quantiser to compare bytes with, the errors: Q4_K (4.5 bits a weight)
    beats Q4_1 (5 bits, one scale per 32) on Gaussian weights thanks to its fitted scales and
    mins, Q6_K sits between Q5_0 and Q8_0; an all-zero block decodes to zeros."""
    x = weights(256, seed=1)
    errors = {name: rms_error(x, name) for name in ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q6_K",
                                                     "Q8_0"]}
    assert errors["Q4_K"] < errors["Q4_1"] < errors["Q4_0"]
    assert errors["Q8_0"] < errors["Q6_K"] < errors["Q5_0"] / 2
    for name in ["Q4_K", "Q6_K"]:
        type_id = gguf_quant.TYPE_IDS[name]
        zero = gguf_file.dequantize(gguf_quant.quantize(torch.zeros(256), type_id), type_id,
                                    (256,))
        assert torch.equal(zero, torch.zeros(256))


def test_q4_k_m_types_follow_llama_quantize():
    """llama-quant.cpp's choices for a 32-layer model: Q6_K for attn_v and ffn_down in layers
    0-3, 6, 9, ..., 28-31 (use_more_bits), Q6_K for output, Q4_K elsewhere, F32 for norms; a
    row that is no whole number of 256-blocks falls back (Q4_K → Q5_0, Q6_K → Q8_0)."""
    config = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                         vocab_size=128256)
    types = {name: gguf_file.GGML_TYPES[t].name
             for name, _, t in gguf_write.tensor_plan(config, "q4_k_m")}
    more = [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert more == [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.5.attn_q.weight"] == types["blk.5.ffn_up.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    smollm2 = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                          vocab_size=49152, tie_embeddings=True)
    types = {name: gguf_file.GGML_TYPES[t].name
             for name, _, t in gguf_write.tensor_plan(smollm2, "q4_k_m")}
    assert types["token_embd.weight"] == "Q8_0"  # the tied head: Q6_K wanted, 576 % 256 != 0
    assert types["blk.4.attn_q.weight"] == "Q5_0" and types["blk.4.ffn_down.weight"] == "Q4_K"


# ---------------------------------------------------------------- a tiny model, end to end

TINY = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=512, vocab_size=512,
                   max_seq_len=128)
TOKENS = torch.tensor([[1, 37, 200, 5, 99, 310, 2, 45, 8, 500]])
# max |logit difference| from the float32 merged model, whose logits here have a std of 0.04;
# measured: f32 0, f16 5.3e-5, bf16 4.3e-4, q8_0 1.4e-3, q4_k_m 1.5e-2 (q4_0 1.7e-2, q4_1 1.4e-2)
TOLERANCE = {"f32": 1e-4, "f16": 2e-4, "bf16": 2e-3, "q8_0": 5e-3, "q4_k_m": 5e-2}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model in our format, with stories260K's SentencePiece tokenizer, and a
    LoRA adapter on all projections and the head (B random, so the merge changes something)."""
    directory = tmp_path_factory.mktemp("tiny")
    shutil.copy(shared_path("models", "stories260K", "tok512.model"), directory / "tok512.model")
    torch.manual_seed(0)
    model = Transformer(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(model, directory / "model")
    shutil.copy(directory / "tok512.model", directory / "model" / "tok512.model")
    apply_lora(model, "all,head", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, directory / "adapter")
    merged = logits(merge_lora(model))
    return directory, merged


def export_tiny(tiny, file_type, adapter=True, name="tiny.gguf"):
    directory, _ = tiny
    path = directory / file_type / name
    args = [str(directory / "model"), "--gguf", str(path), "--type", file_type, "--force"]
    export.main(args + (["--adapter", str(directory / "adapter")] if adapter else []))
    return path


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0", "q4_k_m"])
def test_tiny_export_reads_back_with_the_merged_logits(tiny, file_type):
    """The adapter is folded in as each tensor is written; our reader gets the merged model's
    logits back (float32: to rounding; the others within their stated tolerance)."""
    _, merged = tiny
    path = export_tiny(tiny, file_type)
    model, config = load_checkpoint(path)
    assert not config.tie_embeddings  # the head's adapter gave it its own matrix
    assert (logits(model) - merged).abs().max().item() <= TOLERANCE[file_type]


@pytest.mark.parametrize("file_type", ["f32", "q8_0"])
def test_transformers_gguf_loader_gives_the_same_logits(tiny, file_type):
    """transformers' own GGUF loader (names, shapes, the q/k row order it un-permutes, tensor
    types) on the exported file."""
    transformers = pytest.importorskip("transformers")
    path = export_tiny(tiny, file_type)
    ours, _ = load_checkpoint(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (theirs(TOKENS).logits - logits(ours)).abs().max().item()
    assert difference <= 1e-4


def test_llama31_rope_scaling_travels_as_rope_freqs(tiny, tmp_path):
    directory, _ = tiny
    config = replace(TINY, rope_scaling=llama3_scaling(8.0), max_seq_len=512)
    model = Transformer(config)
    save_checkpoint(model, tmp_path / "model")
    shutil.copy(directory / "tok512.model", tmp_path / "model")
    export.main([str(tmp_path / "model"), "--gguf", str(tmp_path / "m.gguf"), "--type", "f32"])
    back, back_config = load_checkpoint(tmp_path / "m.gguf")
    assert back_config.rope_scaling == config.rope_scaling
    assert (logits(back) - logits(model)).abs().max().item() <= 1e-5


def test_sentencepiece_tokenizer_and_metadata(tiny):
    """The keys llama.cpp reads, and a vocabulary the gguf package reads back as written."""
    directory, _ = tiny
    path = export_tiny(tiny, "f16", adapter=False)
    reader = gguf.GGUFReader(path)
    sp = Tokenizer.from_file(directory / "tok512.model").sp
    fields = reader.fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in fields["tokenizer.ggml.tokens"].data]
    assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert str(bytes(fields["tokenizer.ggml.model"].parts[-1]), "utf-8") == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == sp.eos_id()
    for tensor in reader.tensors:  # aligned as llama.cpp requires
        assert tensor.data_offset % 32 == 0
    assert (directory / "f16" / "tiny.Modelfile").read_text().startswith("FROM ./tiny.gguf\n")


def test_llama3_tiktoken_tokenizer_becomes_gguf_bpe(tmp_path):
    """Llama-3's rank file has no merge list: the one we write (every split of a token into two
    tokens, 280147 of them, as Hugging Face's converter makes) tokenizes as tiktoken does when
    read back as GGUF byte-level BPE ("gpt2", "llama-bpe")."""
    tiktoken_tok = Tokenizer.from_file(shared_path("models", "llama3-tokenizer"))
    metadata = gguf_write.tokenizer_metadata(tiktoken_tok, None,
                                             tiktoken_tok.special_id("<|eot_id|>"))
    assert len(metadata["tokenizer.ggml.merges"]) == 280147
    assert metadata["tokenizer.ggml.eot_token_id"] == 128009
    header, _ = gguf_write.header_bytes(metadata, [])
    path = tmp_path / "llama3.gguf"
    path.write_bytes(header)
    back = Tokenizer.from_file(path)
    for text in ["Hello world! 12345 numbers,   spaces\n\nand ünïcödé 🙂",
                 "def f(x):\n    return x ** 2  # comment", "I'm   they'll DON'T"]:
        assert back.encode(text) == tiktoken_tok.encode(text)
    assert (back.bos_id, back.eos_id) == (tiktoken_tok.bos_id, tiktoken_tok.eos_id)


# ---------------------------------------------------------------- mistakes: one line each

def fails(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        export.run_cli(export.main, [str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unknown_type_is_one_line(tiny, capsys):
    directory, _ = tiny
    fails(capsys, [directory / "model", "--gguf", directory / "x.gguf", "--type", "q3_k"],
          "q3_k")


def test_existing_output_is_refused_without_force(tiny, capsys):
    directory, _ = tiny
    target = directory / "exists.gguf"
    target.write_text("keep me")
    fails(capsys, [directory / "model", "--gguf", target], "--force")
    assert target.read_text() == "keep me"


def test_export_of_a_runs_best_is_its_best_adapter_on_its_base(tmp_path, capsys):
    """export.py RUN/best reads best/ as a run: the adapter of the lowest held-out loss, folded
    into the run's base model (LoRA on stories260K, evaluated at every step)."""
    from test_train import run, stories_argv
    out = tmp_path / "run"
    run(stories_argv(out, "--val-split", 0.3, "--max-steps", 4, "--eval-every", 1))
    best_step = json.loads((out / "best" / "best.json").read_text())["step"]
    path = tmp_path / "best.gguf"
    export.main([str(out / "best"), "--gguf", str(path), "--type", "f32"])
    assert f"using its adapter {out / 'best' / 'adapter'}" in capsys.readouterr().err
    base, _ = load_checkpoint(shared_path("models", "stories260K"))
    untuned = logits(base)
    best = logits(merge_lora(load_adapter(base, out / "best" / "adapter")))
    exported = logits(load_checkpoint(path)[0])
    assert (exported - best).abs().max() <= 1e-4
    assert (exported - untuned).abs().max() > 1e-2  # the best adapter did change the model
    assert best_step >= 1


def test_a_run_without_a_finished_model_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run_format": 1, "checkpoint": "x"}))
    (run / "checkpoint.pt").write_bytes(b"")
    fails(capsys, [run, "--gguf", tmp_path / "x.gguf"], "has not finished")


def test_a_full_disk_leaves_no_file(tiny, tmp_path, capsys, monkeypatch):
    import errno

    directory, _ = tiny
    calls = []

    def quantize_then_fill_the_disk(t, type_id):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return gguf_quant.quantized_parts(t, type_id)
    monkeypatch.setattr(gguf_write, "quantized_parts", quantize_then_fill_the_disk)
    target = tmp_path / "full.gguf"
    fails(capsys, [directory / "model", "--gguf", target], "no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no temporary file


# ---------------------------------------------------------------- the real SmolLM2

@pytest.fixture(scope="module")
def smollm2_q8(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "smollm2.gguf"
    export.main([str(smollm2_path), "--gguf", str(path), "--type", "q8_0"])
    return path


def test_smollm2_export_keeps_tokenizer_and_chat_template(smollm2_path, smollm2_q8, smollm2):
    """Every tokenizer key as the original file has it, so the exported model tokenizes and
    formats a chat as the original does; its weights are the original's to Q8_0's rounding."""
    source = gguf_file.read_gguf_header(smollm2_path).metadata
    exported = gguf_file.read_gguf_header(smollm2_q8).metadata
    for key, value in source.items():
        if key.startswith("tokenizer.") and isinstance(value, np.ndarray):  # numeric arrays
            assert np.array_equal(exported[key], value), key
        elif key.startswith("tokenizer."):
            assert exported[key] == value, key
    again = Tokenizer.from_file(smollm2_q8)
    text = "Give three tips for staying healthy, 2024 edition!"
    assert again.encode(text) == smollm2.encode(text)
    assert again.chat_template == smollm2.chat_template
    modelfile = smollm2_q8.with_suffix(".Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


# ---------------------------------------------------------------- every export in its consumer

def test_transformers_generate_stops_where_ours_stops(smollm2_path, smollm2, tmp_path):
    """generation_config.json names every end id of the template: transformers' greedy
    generate() on the hf/ export ends where ours ends, at <|im_end|>, instead of running into
    a new turn."""
    transformers = pytest.importorskip("transformers")
    from data import encode_prompt
    from templates import get_template
    from generate import generate
    model, _ = load_checkpoint(smollm2_path)
    ids = encode_prompt("What is the capital of France?", smollm2, get_template("chatml"))
    ours = list(generate(model, smollm2, ids, 40, temperature=0.0))
    assert len(ours) < 40  # it stopped by itself
    export.export_hf(model, tmp_path / "hf", smollm2, template_name="chatml")
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert smollm2.special_id("<|im_end|>") in config["eos_token_id"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.eval().generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    theirs = theirs[0, len(ids):].tolist()
    assert theirs[:-1] == ours and theirs[-1] in smollm2.stop_ids


def test_peft_loads_the_adapter_by_itself(tmp_path):
    """A LoRA run on a llama2.c base: `export.py RUN --peft-base` writes the base as a Hugging
    Face directory and points RUN/peft at it by an absolute path; PEFT's own
    AutoPeftModelForCausalLM.from_pretrained(RUN/peft), with no other argument, then gives our
    model's logits."""
    peft = pytest.importorskip("peft")
    import train_sft
    from formats.adapter import load_adapter
    base = shared_path("models", "stories260K")
    out = tmp_path / "run"
    train_sft.main([str(a) for a in [
        "--checkpoint", base, "--data", shared_path("data", "litgpt_fixture_alpaca.json"),
        "--out", out, "--seq-len", 128, "--batch-size", 2, "--grad-accum", 1, "--val-split", 0,
        "--lr", 1e-2, "--warmup-steps", 1, "--max-steps", 2, "--lora-targets", "all"]])
    export.main([str(out), "--peft-base"])
    assert json.loads((out / "peft" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str((out / "peft-base").resolve())
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(out / "peft").eval()
    ours, _ = load_checkpoint(base)
    load_adapter(ours, out / "adapter")
    tokens = torch.tensor([[1, 403, 261, 377, 9, 88, 300]])
    with torch.no_grad():
        assert (theirs(tokens).logits - ours.eval()(tokens)).abs().max().item() <= 1e-4


def test_export_peak_measures_an_export_of_a_random_checkpoint(tmp_path, capsys):
    """bench/export_peak.py (the 8B number in docs/formats.md), at the tiny shape: a sharded
    random HF checkpoint and adapter, export.py run on them as a child, its memory read."""
    from bench import export_peak
    tokenizer = shared_path("models", "stories260K", "tok512.model")
    export_peak.main(["--shape", "tiny", "--tokenizer", str(tokenizer), "--work",
                      str(tmp_path), "--shard-gb", "0.0002", "--keep"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(list((tmp_path / "checkpoint").glob("shard-*.safetensors"))) > 1
    _, config = load_checkpoint(tmp_path / "tiny-f16.gguf")
    tiny = ModelConfig.from_name("tiny")
    assert [getattr(config, k) for k in SHAPE_FIELDS] == [getattr(tiny, k) for k in SHAPE_FIELDS]
    assert 0 < result["peak_anon_gib"] <= result["peak_rss_gib"] < 2
    assert result["gguf_gib"] == round((tmp_path / "tiny-f16.gguf").stat().st_size / 2**30, 3)
