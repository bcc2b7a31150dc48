"""memory.py's estimate against the peaks measured on an H100 (bench.py and train_sft.py runs
of README: Performance and "Run it for real"): within ±25% for LoRA, QLoRA and full
fine-tuning, with and without activation checkpointing. The models are built on the meta
device: no memory."""
import pytest
import torch

from lora import apply_lora
from run.memory import estimate_memory
from model import ModelConfig, Transformer
from projections import is_target, replace_module
from speed.quant import DEFAULT_TARGETS, HostEmbedding, NF4Linear
from train_sft import DEMO_CONFIG, TrainConfig

SMOLLM2 = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                      vocab_size=49152, rope_theta=100000.0, max_seq_len=8192,
                      tie_embeddings=True)
# (shape, method, batch, seq, grad_ckpt, LoRA dropout, trained weights ("fp32", "pure-bf16", or
# "adamw-bf16": float32 weights with AdamW's moments in bf16), --compile, GPUs, measured peak GiB
# per GPU). bench/bench.py rows: LoRA r=16 on all seven projections, no dropout; measured
# 2026-11-26 on an H100 (the torchrun row on 2× H200) with today's code (docs/performance.md).
# SmolLM2 rows: train_sft.py, eager, dropout 0.05, batch 8 of Alpaca records whose widest batch
# is 471 tokens (measured in the previous session, before the compiled-only changes since).
MEASURED = [
    ("llama-3.2-1b", "lora", 8, 2048, False, 0.0, "fp32", True, 1, 16.89),
    ("llama-3.2-1b", "full", 8, 2048, False, 0.0, "fp32", True, 1, 30.11),
    ("llama-3.2-1b", "full", 8, 2048, False, 0.0, "pure-bf16", True, 1, 21.06),
    ("llama-3.2-1b", "full", 8, 2048, False, 0.0, "adamw-bf16", True, 1, 25.51),
    ("llama-3.2-1b", "full", 8, 2048, True, 0.0, "fp32", True, 1, 20.29),
    ("llama-3-8b", "lora", 2, 2048, False, 0.0, "fp32", True, 1, 27.89),
    ("llama-3-8b", "lora", 2, 4096, False, 0.0, "fp32", True, 1, 40.17),
    ("llama-3-8b", "lora", 4, 2048, True, 0.0, "fp32", True, 1, 19.74),
    ("llama-2-7b", "lora", 4, 2048, False, 0.0, "fp32", True, 1, 37.14),
    ("llama-3-8b", "qlora", 2, 2048, True, 0.0, "fp32", True, 1, 7.29),
    ("smollm2", "lora", 8, 471, False, 0.05, "fp32", False, 1, 4.52),
    ("smollm2", "qlora", 8, 471, False, 0.05, "fp32", False, 1, 4.37),
    ("smollm2", "full", 8, 471, False, 0.0, "fp32", False, 1, 6.57),
    # torchrun, FSDP, 2× H200
    ("llama-3-8b", "full", 1, 2048, True, 0.0, "pure-bf16", True, 2, 33.34),
]


def meta_model(shape, method, dropout, weights):
    config = SMOLLM2 if shape == "smollm2" else ModelConfig.from_name(shape)
    dtype = torch.bfloat16 if method != "full" or weights == "pure-bf16" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(config)
            if method == "qlora":
                for name, module in list(model.named_modules()):
                    if is_target(name, DEFAULT_TARGETS):
                        weight = torch.empty(module.weight.shape)
                        replace_module(model, name, NF4Linear.from_weight(weight))
            if method != "full":
                apply_lora(model, "all", r=16, alpha=32, dropout=dropout)
        if method == "qlora" and not config.tie_embeddings:  # as train_sft.build_model does
            model.embed_tokens = HostEmbedding(torch.empty(model.embed_tokens.weight.shape))
    finally:
        torch.set_default_dtype(previous)
    return model


@pytest.mark.parametrize("shape,method,batch,seq,ckpt,dropout,weights,compiled,gpus,measured",
                         MEASURED)
def test_estimate_within_a_quarter_of_the_measured_peak(shape, method, batch, seq, ckpt, dropout,
                                                        weights, compiled, gpus, measured):
    model = meta_model(shape, method, dropout, weights)
    settings = TrainConfig(method=method, batch_size=batch, seq_len=seq, grad_ckpt=ckpt,
                           precision="bf16", loss_chunk=1024, compile=compiled, world_size=gpus,
                           adamw_state="bf16" if weights == "adamw-bf16" else "fp32")
    estimate = estimate_memory(model, settings)["total"]
    assert 0.75 <= estimate / measured <= 1.25, (f"estimate {estimate:.2f} GiB, "
                                                 f"measured {measured} GiB")


def memory(model, batch_size=4, grad_ckpt=False, precision="fp32"):
    config = TrainConfig(batch_size=batch_size, seq_len=256, precision=precision,
                         grad_ckpt=grad_ckpt, loss_chunk=4096)
    return estimate_memory(model, config)


def test_estimate_memory():
    model = Transformer(DEMO_CONFIG)
    n = sum(p.numel() for p in model.parameters())
    est = memory(model)
    assert set(est) == {"weights", "gradients", "optimizer", "activations", "logits", "total"}
    assert all(v > 0 for v in est.values())
    assert est["weights"] == est["gradients"] == n * 4 / 2**30
    assert est["optimizer"] == 2 * est["weights"]
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    bigger = memory(model, batch_size=8)
    assert bigger["activations"] == pytest.approx(2 * est["activations"])
    assert bigger["total"] > est["total"]
    assert bigger["weights"] == est["weights"]
    ckpt = memory(model, grad_ckpt=True)
    assert ckpt["activations"] < est["activations"] / 2 and ckpt["total"] < est["total"]
    # half the bytes, plus autocast's bf16 copy of each matrix
    bf16 = memory(model, precision="bf16")
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert bf16["activations"] == pytest.approx(est["activations"] / 2 + matrices * 2 / 2**30)
    torch.manual_seed(0)
    apply_lora(model, "q,v", r=4)  # LoRA: gradients and AdamW moments only for the adapters
    lora = memory(model)
    assert 0 < lora["gradients"] < est["gradients"] / 10
    assert lora["optimizer"] == 2 * lora["gradients"]
