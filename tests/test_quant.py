"""NF4 quantisation (speed/quant.py): the level table, the packed format, the error it makes, and a
QLoRA model (4-bit frozen base + LoRA adapters) that trains and merges back to a plain model.

The error bounds below were measured on seeded data and given a margin; the numbers are those
of NF4 itself (the paper's 4-bit NormalFloat with blocks of 64), not of this implementation.
"""
import copy
import gc
import weakref
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from errors import UserError
from model import ModelConfig, Transformer
from speed.quant import (NF4_LEVELS, NF4Linear, dequantize_model, dequantize_nf4, nf4_bytes,
                         nf4_levels_from_normal, pack_codes, quantize_model, quantize_nf4,
                         quantized_bytes, unpack_codes)


def relative_error(approx, exact):
    """‖approx − exact‖ / ‖exact‖ (a relative RMS error)."""
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def normal_weights(n=1 << 20, std=0.02, seed=0):
    return torch.randn(n // 1024, 1024, generator=torch.Generator().manual_seed(seed)) * std


def tiny_model(seed=0, **overrides):
    config = ModelConfig(**{**vars(ModelConfig.from_name("tiny")), **overrides})
    model = Transformer(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


TOKENS = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))


def test_nf4_levels():
    assert NF4_LEVELS.shape == (16,)
    assert torch.equal(NF4_LEVELS, NF4_LEVELS.sort().values)
    assert NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1 and (NF4_LEVELS == 0).sum() == 1
    assert (NF4_LEVELS > 0).sum() == 8 and (NF4_LEVELS < 0).sum() == 7  # the extra code is positive
    # the written-out constants (bitsandbytes') are the normal quantiles, up to float32 rounding
    torch.testing.assert_close(nf4_levels_from_normal(), NF4_LEVELS, rtol=0, atol=1e-6)


def test_error_on_normal_weights():
    """1M values of N(0, 0.02): NF4 with blocks of 64 is off by ≈ 9.2% RMS (measured 0.0920)."""
    w = normal_weights()
    q = quantize_nf4(w, block_size=64, double_quant=False)
    error = relative_error(dequantize_nf4(q, torch.float32), w)
    assert 0.08 < error < 0.10  # below 0.08 would be suspicious too (0 = nothing was quantised)
    # 16 evenly spaced levels (absmax int4, codes -7..7) do worse on the same data: why NF4 exists
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    int4 = torch.round(blocks / absmax * 7) / 7 * absmax
    assert error < relative_error(int4.view_as(w), w)
    assert dequantize_nf4(q).dtype == torch.bfloat16  # the default output dtype


def test_values_are_levels_times_block_scale():
    w = normal_weights(n=64 * 1024)
    q = quantize_nf4(w, block_size=64, double_quant=False)
    codes = unpack_codes(q.packed).long()
    deq = dequantize_nf4(q, torch.float32).view(-1, 64)
    assert torch.equal(deq, NF4_LEVELS[codes].view(-1, 64) * q.absmax[:, None])  # exactly
    # each block's largest |w| maps to level ±1, so it comes back exactly
    blocks = w.view(-1, 64)
    where = blocks.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(deq.gather(1, where), blocks.gather(1, where))
    # the chosen code is the nearest level (brute force: distance to all 16)
    normalised = (blocks / q.absmax[:, None]).flatten()
    nearest = (normalised[:, None] - NF4_LEVELS).abs().argmin(dim=1)
    assert torch.equal(codes, nearest)


def test_packing_round_trips():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (1000,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert torch.equal(unpack_codes(packed), codes)
    assert packed[0] == codes[0] * 16 + codes[1]  # first code in the high 4 bits
    any_bytes = torch.randint(0, 256, (300,), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(any_bytes)), any_bytes)


def test_sizes_that_are_not_a_multiple_of_the_block():
    w = torch.randn(3, 37)  # 111 values: padded to 2 blocks of 64 with zeros
    q = quantize_nf4(w, block_size=64)
    assert q.packed.numel() == 64 and q.absmax_codes.numel() == 2
    deq = dequantize_nf4(q, torch.float32)
    assert deq.shape == (3, 37) and relative_error(deq, w) < 0.15
    all_zero = quantize_nf4(torch.zeros(5, 7))
    assert dequantize_nf4(all_zero, torch.float32).abs().max() == 0
    for bad in (0, 7):
        with pytest.raises(UserError, match="even number"):
            quantize_nf4(w, block_size=bad)


def test_double_quantisation():
    w = normal_weights()
    plain = quantize_nf4(w, double_quant=False)
    double = quantize_nf4(w, double_quant=True)
    scales = plain.absmax
    approx = double.block_scales()
    # int8 with a step per group of 256: each scale is off by at most half its group's step
    steps = double.absmax_scale.repeat_interleave(256)[:scales.numel()]
    assert ((approx - scales).abs() <= steps / 2 + 1e-9).all()
    assert ((approx - scales).abs() / scales).max() < 0.005  # measured 0.002
    # and the weights barely notice: 0.09198 -> 0.09199
    error_plain = relative_error(dequantize_nf4(plain, torch.float32), w)
    error_double = relative_error(dequantize_nf4(double, torch.float32), w)
    assert abs(error_double - error_plain) < 0.001


def test_bytes_per_parameter():
    n = 4096 * 4096
    assert nf4_bytes(n, 64, double_quant=False) * 8 / n == 4.5               # 4 + 32/64
    assert abs(nf4_bytes(n, 64, double_quant=True) * 8 / n - 4.127) < 0.001  # 4 + 8/64 + 32/16384
    for double_quant in (False, True):
        model = quantize_model(tiny_model(), double_quant=double_quant)
        layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
        sizes = [m.in_features * m.out_features for m in layers]
        expected = sum(nf4_bytes(size, 64, double_quant) for size in sizes)
        assert quantized_bytes(model) == expected
        assert expected < 0.6 * sum(sizes)  # ≈ 0.5 byte a weight


def test_nf4_linear_forward_and_backward():
    w = torch.randn(96, 64) * 0.02
    layer = NF4Linear.from_weight(w, compute_dtype=torch.float32)
    assert (layer.in_features, layer.out_features) == (64, 96) and isinstance(layer, nn.Linear)
    # frozen: buffers only
    assert list(layer.parameters()) == [] and layer.packed.dtype == torch.uint8
    deq = dequantize_nf4(layer.quantized, torch.float32)
    assert torch.equal(layer.weight, deq)
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved = []  # every tensor autograd keeps for the backward pass

    def keep_shape(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep_shape, lambda t: t):
        y = layer(x)
    assert torch.Size([96, 64]) not in saved  # no dequantised weight kept alive (NF4Matmul's point)
    y.square().sum().backward()
    x2 = x.detach().requires_grad_()
    y2 = F.linear(x2, deq)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # it computes in its input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_quantize_model():
    model = tiny_model()
    original = copy.deepcopy(model)
    old_weight = weakref.ref(model.layers[0].attn.q_proj.weight)
    quantize_model(model, compute_dtype=torch.float32)
    gc.collect()
    assert old_weight() is None  # the 16-bit weight was released
    quantised = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantised) == 7 * model.config.n_layers
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        exact = original(TOKENS)
        approx = model(TOKENS)
    assert 0.03 < relative_error(approx, exact) < 0.15  # measured 0.088, the weights' own ~9%
    assert isinstance(quantize_model(tiny_model(), targets=["lm_head"]).lm_head, NF4Linear)
    with pytest.raises(UserError, match="tied"):
        quantize_model(tiny_model(tie_embeddings=True), targets=["lm_head"])


def test_qlora_trains_only_the_adapters_and_merges():
    model = quantize_model(tiny_model(), compute_dtype=torch.float32)
    torch.manual_seed(0)  # lora_A's random init
    # NF4Linear is an nn.Linear: LoRALinear wraps it as is
    lora.apply_lora(model, "all", r=4, alpha=8)
    assert isinstance(model.layers[0].mlp.up_proj.base, NF4Linear)
    frozen = {name: b.clone() for name, b in model.named_buffers()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model.loss(TOKENS, TOKENS) / TOKENS.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 0.2  # measured 6.01 -> 5.68
    with_grad = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters()
                 if p.grad is not None}
    assert with_grad == {"lora_A", "lora_B"}
    assert all(torch.equal(b, frozen[name]) for name, b in model.named_buffers())
    # export: dequantise the base, then merge as for any LoRA model -> a plain model again
    with torch.no_grad():
        before = model(TOKENS)
    lora.merge_lora(dequantize_model(model, torch.float32))
    assert not any(isinstance(m, (NF4Linear, lora.LoRALinear)) for m in model.modules())
    assert type(model.layers[0].attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), before, rtol=1e-4, atol=1e-4)


def test_quantise_while_loading_a_real_checkpoint(tmp_path):
    """load_checkpoint(quantize=True) on stories260K: every projection is NF4, the rest is not,
    and the model still predicts its reference sequence (the float32 loss is 0.1804)."""
    from formats.checkpoint import load_checkpoint
    from conftest import shared_path
    path = shared_path("models", "stories260K")
    model, config = load_checkpoint(path, quantize=True)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 7 * config.n_layers
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    ids = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317,
                         426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295,
                         433, 426]])
    with torch.no_grad():
        loss = (model.loss(ids, ids) / 31).item()
    assert 0.1804 < loss < 0.35  # NF4 costs a little, not everything (a broken load gives > 5)


def test_train_sft_qlora_end_to_end(tmp_path):
    """--method qlora trains adapters on an NF4 base and --merge exports a plain 16-bit model."""
    import train_sft
    from formats.checkpoint import load_checkpoint
    from conftest import shared_path
    out = tmp_path / "run"
    train_sft.main(["--checkpoint", str(shared_path("models", "stories260K")), "--method", "qlora",
                    "--data", str(shared_path("data", "litgpt_fixture_alpaca.json")),
                    "--val-split", "0", "--max-steps", "3", "--batch-size", "2",
                    "--grad-accum", "1", "--seq-len", "128", "--out", str(out), "--merge"])
    assert (out / "adapter" / "adapter.safetensors").exists()
    merged, _ = load_checkpoint(out / "model")
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())


def test_host_embedding_looks_up_the_same_rows_and_keeps_its_name():
    """QLoRA's embedding in CPU memory (quant.HostEmbedding): the same vectors as the model's own
    embedding, frozen, under the same state_dict key (checkpoints and exports do not change)."""
    from speed.quant import HostEmbedding
    model = tiny_model(tie_embeddings=False)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    before = model.loss(tokens, tokens)
    original = model.embed_tokens
    model.embed_tokens = HostEmbedding(original.weight)
    assert torch.equal(model.embed_tokens(tokens), original(tokens))
    assert not model.embed_tokens.weight.requires_grad
    assert torch.equal(model.loss(tokens, tokens), before)
    assert "embed_tokens.weight" in model.state_dict()


def test_embedding_to_host_leaves_cpu_models_and_tied_embeddings_alone():
    from speed.quant import HostEmbedding, embedding_to_host
    model = tiny_model(tie_embeddings=False)
    embedding_to_host(model)  # already in CPU memory: nothing to move
    assert type(model.embed_tokens) is nn.Embedding
    with torch.device("meta"):  # (as if on a GPU)
        tied = Transformer(replace(ModelConfig.from_name("tiny"), tie_embeddings=True))
    embedding_to_host(tied)  # the output head needs the whole matrix on the device
    assert not isinstance(tied.embed_tokens, HostEmbedding)
