"""FP8 products (speed/fp8.py, --fp8), on the CPU, where torch emulates torch._scaled_mm: the
rounding of e4m3, the layers' forward and backward against float32 products, the layout rules
the GPU's FP8 kernel imposes, the memory of the stored weight, the layers kept in bf16, the
refusals, and LoRA and full fine-tuning steps against the same steps without FP8.

Tolerances: e4m3 rounds to 3 mantissa bits, a relative error of at most 2^-4 a value (RMS about
2.6%, measured); a product of two rounded operands is off by about √2 of that, 3.7% RMS
(measured on seeded data: 3.7-3.8%). The bounds below are 5% (and at least 1%: a bf16 product is
off by 0.3%, so an error below 1% would mean nothing was rounded to FP8).
"""
import functools
import json

import pytest
import torch
import torch.nn as nn

import lora
import train_sft
from conftest import ROOT
from config import parse_args
from errors import UserError
from model import ModelConfig, Transformer
from speed import fp8
from speed.fp8 import (E4M3, E4M3_MAX, Float8Linear, FrozenFloat8Linear, check_fp8,
                       quantize_rows, use_fp8)

FP8_BOUND = 0.05


def relative_error(approx, exact):
    """‖approx − exact‖ / ‖exact‖ (a relative RMS error)."""
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def seeded(*shape, std=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def test_quantize_rows_rounds_each_value_to_e4m3():
    t = seeded(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows six orders of magnitude apart
    t[5] = 0.0  # a prompt token's gradient: a row of zeros
    q, scale = quantize_rows(t)
    assert q.dtype == E4M3 and q.is_contiguous() and scale.shape == (64, 1)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    assert torch.equal(q[5].float(), torch.zeros(256))  # zeros stay zeros, no 0/0
    amax = q.float().abs().amax(dim=1)
    nonzero = torch.arange(64) != 5
    # each row's largest value lands in [224, 448]: the top binade of e4m3, never past it
    assert ((amax[nonzero] >= E4M3_MAX / 2) & (amax[nonzero] <= E4M3_MAX)).all()
    back = q.float() * scale
    # normal e4m3 numbers (|q| >= 2^-6) are off by at most half a unit of the 3-bit mantissa,
    # 2^-4; subnormal ones by at most half the smallest step, 2^-10 (times the row's scale)
    bound = torch.maximum(t.abs() * 2.0**-4, 2.0**-10 * scale)
    assert ((back - t).abs() <= bound).all()
    assert 0.02 < relative_error(back[nonzero], t[nonzero]) < 0.035  # RMS: measured 0.026


def test_quantize_rows_of_a_transposed_view_is_row_major():
    t = seeded(48, 32)
    q, scale = quantize_rows(t.t())
    assert q.shape == (32, 48) and q.is_contiguous() and scale.shape == (32, 1)
    torch.testing.assert_close(q.float() * scale, t.t(), rtol=2.0**-4, atol=1e-3)


@pytest.fixture
def gpu_layout_rules(monkeypatch):
    """torch._scaled_mm as the GPU's rowwise FP8 kernel accepts it (the CPU accepts anything):
    a row-major, b column-major, both e4m3 (b must be), the summed dimension and b's columns
    multiples of 16, scales float32 (M, 1) and (1, N), output bf16. Returns the calls' shapes."""
    real = torch._scaled_mm
    calls = []

    def checked(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
        (m, k), n = a.shape, b.shape[1]
        assert a.dtype == E4M3 and b.dtype == E4M3
        assert a.stride(1) == 1 and b.stride(0) == 1  # a row-major, b column-major
        assert k % 16 == 0 and b.shape[0] == k and n % 16 == 0
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.shape == (m, 1) and scale_b.shape == (1, n)
        assert scale_a.stride(0) == 1 and scale_b.stride(1) == 1
        assert out_dtype == torch.bfloat16
        calls.append((m, k, n))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                    use_fast_accum=use_fast_accum)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    return calls


def test_frozen_fp8_linear_forward_and_input_gradient(gpu_layout_rules):
    """LoRA's frozen base: y and dx within 5% of the float32 products; dx = dy·W with W's
    per-row scales folded into dy is the gradient of the FP8 layer's own (dequantised) weight, up
    to dy's rounding alone; no weight gradient."""
    w = seeded(96, 128, std=0.02, seed=1)
    layer = FrozenFloat8Linear(w)
    x = seeded(3, 7, 128, seed=2).requires_grad_()  # 21 tokens: any count
    y = layer(x)
    assert y.shape == (3, 7, 96) and y.dtype == torch.bfloat16
    grad_y = seeded(3, 7, 96, seed=3)
    y.backward(grad_y.bfloat16())
    assert x.grad.dtype == torch.float32  # the input's dtype
    assert 0.01 < relative_error(y, x.detach() @ w.t()) < FP8_BOUND
    assert 0.01 < relative_error(x.grad, grad_y @ w) < FP8_BOUND
    # against the stored weight, only the rounding of dy (and of x, forward) is left: 2.6%
    stored = layer.weight.float()
    assert relative_error(x.grad, grad_y @ stored) < 0.035
    assert relative_error(y, x.detach() @ stored.t()) < 0.035
    assert [p for p in layer.parameters()] == []  # nothing to train
    assert gpu_layout_rules == [(21, 128, 96), (21, 96, 128)]  # forward, then dx


def test_fp8_linear_forward_and_both_gradients(gpu_layout_rules):
    """Full fine-tuning: y, dx and dW within 5% of the float32 products, dW in the master
    weight's dtype (float32), over 2×13 tokens (padded to 32 for dW's sum)."""
    linear = nn.Linear(128, 80, bias=False)
    linear.weight.data = seeded(80, 128, std=0.02, seed=4)
    master = linear.weight.detach().clone()
    layer = Float8Linear.from_linear(linear)
    assert layer.weight is linear.weight  # the same Parameter: the optimizer's, the checkpoint's
    x = seeded(2, 13, 128, seed=5).requires_grad_()
    y = layer(x)
    grad_y = seeded(2, 13, 80, seed=6)
    y.backward(grad_y.bfloat16())
    assert layer.weight.grad.dtype == torch.float32 and torch.equal(layer.weight, master)
    x_rows, dy_rows = x.detach().reshape(-1, 128), grad_y.reshape(-1, 80)
    assert 0.01 < relative_error(y, x.detach() @ master.t()) < FP8_BOUND
    assert 0.01 < relative_error(x.grad, grad_y @ master) < FP8_BOUND
    assert 0.01 < relative_error(layer.weight.grad, dy_rows.t() @ x_rows) < FP8_BOUND
    assert gpu_layout_rules == [(26, 128, 80), (26, 80, 128), (80, 32, 128)]


def test_stored_weight_takes_half_the_memory_of_bf16():
    w = seeded(256, 512)
    layer = FrozenFloat8Linear(w)
    bf16_bytes = w.to(torch.bfloat16).nbytes
    assert layer.weight_fp8.nbytes == bf16_bytes // 2
    assert layer.weight_scale.nbytes == 256 * 4  # one float32 per output row
    state = layer.state_dict()
    assert set(state) == {"weight_fp8", "weight_scale"}
    assert sum(t.nbytes for t in state.values()) < 0.51 * bf16_bytes
    assert layer.weight.shape == (256, 512) and layer.weight.dtype == torch.bfloat16


def tiny_model(ffn_hidden=172, seed=0):
    config = ModelConfig(**{**vars(ModelConfig.from_name("tiny")), "ffn_hidden": ffn_hidden})
    model = Transformer(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def test_layers_not_multiples_of_16_keep_bf16_products():
    """The tiny shape's MLP is 64 × 172: gate, up and down keep their nn.Linear, said once."""
    model = tiny_model(ffn_hidden=172)
    said = []
    chosen = use_fp8(model, "lora", say=said.append)
    assert len(said) == 1
    assert said[0] == ("note: --fp8: 6 of 14 projections keep bf16 products: their shapes "
                       "(172×64, 64×172) are not multiples of 16, which the FP8 kernels need")
    assert chosen == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"]
    block = model.layers[0]
    assert type(block.attn.q_proj) is FrozenFloat8Linear and type(block.mlp.up_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear  # the head and the loss stay bf16


def lora_step_grads(model, tokens, labels):
    """The loss and the adapters' gradients of one step under bf16 autocast, as train_sft.py runs
    it."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(tokens, labels) / labels.numel()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_training_step_with_fp8_matches_bf16(method, gpu_layout_rules):
    """One step of a tiny model (every projection FP8: ffn 176) with and without --fp8: the loss
    within 1% (measured: 0.02%), every trained matrix's gradient within 12% (measured: 4-9%; a
    gradient passes through the FP8 products of every layer above it)."""
    models = [tiny_model(ffn_hidden=176, seed=3) for _ in range(2)]
    for model, with_fp8 in zip(models, (False, True)):
        if method == "lora":
            model.to(torch.bfloat16)
        if with_fp8:
            assert len(use_fp8(model, method, say=pytest.fail)) == 14  # nothing kept in bf16
        if method == "lora":
            torch.manual_seed(0)
            lora.apply_lora(model, "all", r=4, alpha=8)
            for layer in lora.lora_layers(model).values():  # B ≠ 0, so A gets a gradient
                nn.init.normal_(layer.lora_B, std=0.02)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(7))
    (loss, grads), (loss8, grads8) = (lora_step_grads(m, tokens, tokens) for m in models)
    assert abs(loss8 - loss) / loss < 0.01
    assert grads.keys() == grads8.keys()
    errors = {n: relative_error(grads8[n], g) for n, g in grads.items() if g.dim() == 2}
    assert max(errors.values()) < 0.12, errors
    # forward 14; dx 14, less layer 0's q, k, v under LoRA (their input, the frozen embedding's
    # output, needs no gradient); dW 14 (full)
    assert len(gpu_layout_rules) == (14 + 11 if method == "lora" else 3 * 14)


def test_refusals():
    def refusal(**kwargs):
        settings = dict(method="lora", precision="bf16", device="cpu") | kwargs
        with pytest.raises(UserError) as info:
            check_fp8(**settings)
        return str(info.value)

    assert refusal() == ("--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 "
                         "or higher); --device cpu has none")
    check_fp8("lora", "bf16", "cpu", allow_cpu=True)  # the tests' CPU path
    assert refusal(method="qlora", allow_cpu=True).startswith(
        "--fp8 is for --method lora or full: QLoRA's frozen base is NF4, 4 bits a weight")
    assert refusal(precision="fp32", allow_cpu=True).startswith(
        "--fp8 needs --precision bf16 (got fp32)")
    assert refusal(dora=True, allow_cpu=True).startswith("--fp8 does not combine with --dora")
    assert refusal(merge=True, allow_cpu=True).startswith("--fp8 with --merge would merge")
    check_fp8("full", "bf16", "cpu", merge=True, allow_cpu=True)  # its own weights: merged as ever


def test_train_sft_refuses_fp8_on_a_cpu_in_one_line():
    with pytest.raises(UserError) as info:
        parse_args(["--fp8", "--device", "cpu"])
    assert str(info.value).startswith("--fp8 needs a CUDA GPU with FP8 tensor cores")


def test_refused_on_a_gpu_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError) as info:
        check_fp8("lora", "bf16", "cuda:0")
    assert str(info.value) == ("--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 "
                               "or higher: Ada, Hopper, Blackwell); cuda:0 (NVIDIA A100-SXM4-80GB) "
                               "has 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    check_fp8("full", "bf16", "cuda:0")  # an H100: accepted


def test_train_sft_with_fp8(tmp_path, monkeypatch):
    """train_sft.py's demo model, LoRA, with --fp8 (the CPU let through by check_fp8's test-only
    argument): the frozen projections are FP8 layers, the losses of 3 steps follow the run
    without --fp8 within 1% (measured: under 0.1%), and the adapter is written."""
    monkeypatch.setattr(fp8, "check_fp8", functools.partial(fp8.check_fp8, allow_cpu=True))
    real_step, seen = train_sft.train_step, []

    def spy(model, *args, **kwargs):
        seen.append(type(model.layers[0].mlp.down_proj.base))
        return real_step(model, *args, **kwargs)
    monkeypatch.setattr(train_sft, "train_step", spy)
    losses = {}
    for with_fp8 in (False, True):
        out = tmp_path / f"fp8-{with_fp8}"
        argv = ["--checkpoint", "tiny", "--data", ROOT / "examples" / "alpaca_demo.json",
                "--out", out, "--method", "lora", "--precision", "bf16", "--template", "none",
                "--seq-len", 48, "--batch-size", 2, "--grad-accum", 1, "--max-steps", 3,
                "--val-split", 0, "--warmup-steps", 1] + (["--fp8"] if with_fp8 else [])
        train_sft.main([str(a) for a in argv])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[with_fp8] = [row["loss"] for row in rows if "loss" in row]
        assert (out / "adapter").is_dir()
    assert seen == [nn.Linear] * 3 + [FrozenFloat8Linear] * 3
    assert len(losses[True]) == 3
    for bf16_loss, fp8_loss in zip(losses[False], losses[True]):
        assert abs(fp8_loss - bf16_loss) / bf16_loss < 0.01, losses


def test_train_sft_refuses_fp8_under_torchrun(tmp_path, monkeypatch):
    """Not tried with FSDP: one line before anything is written."""
    monkeypatch.setattr(fp8, "check_fp8", functools.partial(fp8.check_fp8, allow_cpu=True))

    class TwoRanks:
        device, world = "cpu", 2
    monkeypatch.setattr(train_sft, "start_processes", lambda device: TwoRanks())
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        train_sft.main(["--fp8", "--precision", "bf16", "--out", str(out)])
    assert str(info.value) == "--fp8 runs in one process, not under torchrun"
    assert not out.exists()


def test_fp8_layers_compile_in_one_graph():
    """torch.compile (what --compile does to each block) traces both autograd Functions whole,
    backward included, and gives the eager results. (aot_eager: the graph capture of --compile
    without generating kernels, which a CPU would take long over.)"""
    torch.manual_seed(0)
    full = Float8Linear.from_linear(nn.Linear(64, 32, bias=False))
    frozen = FrozenFloat8Linear(seeded(32, 64, std=0.02))

    def forward(x):
        return (full(x) * frozen(x)).float().sum()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    x = seeded(3, 5, 64).requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    compiled(x).backward()
    forward(x_eager).backward()
    assert torch.equal(x.grad, x_eager.grad) and x.grad.abs().sum() > 0
