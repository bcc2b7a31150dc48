"""Correctness guard for the levers bench/bench.py measures: the compiled blocks and chunk loss, the
chunked LinearCrossEntropy and packed rows must give the loss of the plain path (float32: to
rounding; bf16 autocast: to bf16 tolerance)."""
import copy

import torch

from speed.fused_loss import chunked_loss, compile_for_training
from model import IGNORE_INDEX, ModelConfig, Transformer


def tiny_model(seed=0):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300)
    model = Transformer(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.train()


def batch(seed=1, B=2, S=48):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (B, S), generator=g)
    labels = tokens.clone()
    labels[:, :12] = IGNORE_INDEX
    return tokens, labels


def loss_and_grad(model, tokens, labels, **kw):
    """The plain loss, or with chunk_size= the chunked one (as train_sft.batch_loss picks)."""
    model.zero_grad()
    loss = chunked_loss(model, tokens, labels, **kw) if kw else model.loss(tokens, labels)
    loss.backward()
    return loss.item(), model.layers[0].attn.q_proj.weight.grad.clone()


def test_chunked_loss_under_bf16_autocast():
    model, (tokens, labels) = tiny_model(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grad(model, tokens, labels)
        chunked = loss_and_grad(model, tokens, labels, chunk_size=16)
    assert abs(chunked[0] - plain[0]) <= 1e-2 * abs(plain[0])
    assert (chunked[1] - plain[1]).norm() <= 2e-2 * plain[1].norm()


def test_compiled_model_gives_the_same_loss_and_gradients():
    model, (tokens, labels) = tiny_model(), batch()
    compiled = copy.deepcopy(model)
    compile_for_training(compiled)
    want = loss_and_grad(model, tokens, labels, chunk_size=16)
    got = loss_and_grad(compiled, tokens, labels, chunk_size=16)
    assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0])
    assert (got[1] - want[1]).abs().max() <= 1e-5 * want[1].abs().max()


def test_packed_rows_give_the_loss_of_separate_rows():
    """Two examples packed in one row (doc_ids + restarting positions) = the two run alone."""
    model = tiny_model()
    a, la = batch(seed=2, B=1, S=20)
    b, lb = batch(seed=3, B=1, S=28)
    packed = torch.cat([a, b], 1)
    packed_labels = torch.cat([la, lb], 1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 28])
    positions = torch.cat([torch.arange(20), torch.arange(28)])[None]
    with torch.no_grad():
        separate = model.loss(a, la) + model.loss(b, lb)
        together = chunked_loss(model, packed, packed_labels, positions=positions,
                                doc_ids=doc_ids, chunk_size=16)
    # labels[0] of each example is IGNORE_INDEX (data.py guarantees it): nothing crosses the
    # boundary
    assert abs(together.item() - separate.item()) <= 1e-5 * separate.item()


def test_chunked_loss_gives_the_output_head_gradient_float32_and_bf16_weights():
    """The head's gradient, computed in the loss's forward pass and scaled in backward (the loss
    divided by the targets, as train_step does): float32 weights to rounding; bf16 weights
    (--pure-bf16, summed in bf16 by addmm_) to bf16 tolerance of the float32 gradient."""
    tokens, labels = batch()

    def head_grad(model, **kw):
        model.zero_grad()
        loss = chunked_loss(model, tokens, labels, **kw) if kw else model.loss(tokens, labels)
        (loss / 70).backward()
        return model.lm_head.weight.grad.float()

    model = tiny_model()
    exact = head_grad(model)
    assert torch.allclose(head_grad(model, chunk_size=16), exact, rtol=1e-4, atol=1e-6)
    bf16 = tiny_model().to(torch.bfloat16)
    chunked = head_grad(bf16, chunk_size=16)
    assert (chunked - exact).norm() <= 2e-2 * exact.norm()
    assert bf16.lm_head.weight.grad.dtype == torch.bfloat16
