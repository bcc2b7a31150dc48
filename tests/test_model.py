"""The architecture itself: configs, RoPE, grouped-query attention, the KV cache, packed attention,
the chunked loss and gradient checkpointing. Tiny random float32 models; checkpoint formats (and
their config files) and the comparison with transformers' full model live in test_checkpoint.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

from errors import UserError
from speed.fused_loss import chunked_loss
from model import (IGNORE_INDEX, KVCache, ModelConfig, RMSNorm, Transformer, apply_rotary_embedding,
                   rope_angles, rope_frequencies)

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def tiny(seed=0, **overrides):
    """A tiny GQA model with Llama-3.1 rope, weights large enough that attention is sharp."""
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=80,
              rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), max_seq_len=128)
    config = ModelConfig(**{**kw, **overrides})
    model = Transformer(config)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(std=0.15, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def rand_tokens(shape, vocab=80, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- ModelConfig

def test_config_defaults_and_validation():
    assert ModelConfig(dim=64, n_heads=4, n_kv_heads=2).head_dim == 16
    assert ModelConfig(dim=64, n_heads=4, n_kv_heads=2, head_dim=32).head_dim == 32
    assert ModelConfig(dim=50, n_heads=4, n_kv_heads=2, head_dim=16).head_dim == 16  # dim % n_heads
    with pytest.raises(UserError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelConfig(dim=48, n_heads=6, n_kv_heads=4)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_layers=0), "model config: n_layers=0, but it must be a whole number >= 1"),
    (dict(vocab_size=-5), "model config: vocab_size=-5, but it must be a whole number >= 1"),
    (dict(max_seq_len=None), "model config: max_seq_len=None, but it must be a whole number >= 1"),
    (dict(dim=50, n_heads=4, n_kv_heads=2),
     r"model config: dim=50 is not a multiple of n_heads=4 \(and no head_dim is given\)"),
])
def test_config_rejects_impossible_sizes(overrides, message):
    with pytest.raises(UserError, match=f"^{message}$") as e:
        ModelConfig(**{**dict(dim=64, n_heads=4, n_kv_heads=2), **overrides})
    assert "\n" not in str(e.value)


def test_presets():
    c = ModelConfig.from_name("llama-3.1-8b")
    assert (c.dim, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.vocab_size, c.head_dim) == \
        (4096, 32, 8, 14336, 128256, 128)
    assert c.rope_scaling["factor"] == 8.0 and c.rope_theta == 500000.0
    assert ModelConfig.from_name("llama-3.2-1b").tie_embeddings
    assert not ModelConfig.from_name("llama-2-7b").tie_embeddings
    with pytest.raises(UserError, match="unknown model shape 'gpt-5'.*llama-2-7b.*tiny"):
        ModelConfig.from_name("gpt-5")


# ---------------------------------------------------------------- pieces

def test_rmsnorm():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 9.0)
    assert torch.allclose(norm(x), want, atol=1e-6)
    # a bf16 model stays bf16 (the statistics are taken in float32)
    half = norm.bfloat16()(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), want, rtol=2e-2, atol=2e-2)


def test_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for scaling in (None, LLAMA3_SCALING):
        hf_config = transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
            rope_scaling=None if scaling is None else {"rope_type": "llama3", **scaling})
        kind = "default" if scaling is None else "llama3"
        if kind == "default":
            theirs = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
        else:
            theirs, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
            assert attention_factor == 1.0
        ours = rope_frequencies(ModelConfig(dim=64, n_heads=4, n_kv_heads=4, rope_theta=500000.0,
                                            rope_scaling=scaling))
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    # the scaling changes something: the slow (long-wavelength) channels are divided by the factor
    plain = rope_frequencies(ModelConfig(dim=64, n_heads=4, n_kv_heads=4, rope_theta=500000.0))
    assert torch.equal(ours[:1], plain[:1]) and torch.allclose(ours[-1], plain[-1] / 8)


def test_rope_depends_only_on_distance():
    config = ModelConfig(dim=32, n_heads=2, n_kv_heads=2)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(pq, pk):
        cq, sq = rope_angles(config, torch.tensor([pq]))
        ck, sk = rope_angles(config, torch.tensor([pk]))
        return (apply_rotary_embedding(q, cq, sq) * apply_rotary_embedding(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(8, 3), abs=1e-3)
    # position 0 is the identity, and the pairs are adjacent channels (2i, 2i+1)
    c, s = rope_angles(config, torch.tensor([0]))
    assert torch.equal(apply_rotary_embedding(q, c, s), q)
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0] = 1.0
    c, s = rope_angles(config, torch.tensor([1]))
    rotated = apply_rotary_embedding(x, c, s)[0, 0, 0]
    assert rotated[:2].tolist() == pytest.approx([torch.cos(torch.tensor(1.0)).item(),
                                                  torch.sin(torch.tensor(1.0)).item()])
    assert rotated[2:].abs().max() == 0


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head h uses kv head h // (n_heads / n_kv_heads): the grouping of enable_gqa and of
    HF's repeat_kv."""
    gqa = tiny()
    mha = Transformer(ModelConfig(**{**gqa.config.__dict__, "n_kv_heads": 4})).eval()
    state = gqa.state_dict()
    for i in range(gqa.config.n_layers):
        for proj in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attn.{proj}.weight"].view(2, 16, 64)
            state[f"layers.{i}.attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = rand_tokens((2, 24))
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_causal():
    """Changing a later token leaves the logits of earlier positions unchanged."""
    model = tiny()
    x = rand_tokens((1, 20))
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 80
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2


def test_tied_embeddings():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in tiny().parameters()) - 80 * 64


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("chunks", [[6] + [1] * 26, [1] * 32, [5, 7, 9, 1, 1, 9]])
def test_kv_cache_matches_full_forward(chunks):
    """Prefill then one token at a time, or several multi-token chunks (each chunk's queries must
    see the whole cache plus a causal mask over the chunk itself)."""
    model = tiny()
    x = rand_tokens((2, sum(chunks)))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, batch_size=2, max_len=40)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(x[:, start:start + n], cache=cache))
            start += n
            assert cache.length == start
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_kv_cache_stores_keys():
    model = tiny()
    cache = KVCache(model.config, batch_size=1, max_len=16)
    assert cache.k.shape == (2, 1, 2, 16, 16)
    with torch.no_grad():
        model(rand_tokens((1, 5)), cache=cache)
    assert cache.k[:, :, :, :5].abs().sum() > 0 and cache.k[:, :, :, 5:].abs().sum() == 0


# ---------------------------------------------------------------- packed rows

def test_packed_attention_equals_separate_documents():
    model = tiny()
    rows = [[7, 12, 5], [24]]  # document lengths in each packed row of 24 tokens
    x = rand_tokens((2, 24), seed=3)
    doc_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in rows])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in rows])
    with torch.no_grad():
        packed = model.hidden_states(x, positions=positions, doc_ids=doc_ids)
        for r, row in enumerate(rows):
            start = 0
            for n in row:
                alone = model.hidden_states(x[r:r + 1, start:start + n])
                assert (packed[r, start:start + n] - alone[0]).abs().max().item() <= 1e-5
                start += n
        # without the document mask the later documents would see the earlier ones
        unmasked = model.hidden_states(x, positions=positions)
    assert (unmasked[0, 7:] - packed[0, 7:]).abs().max() > 1e-2


def test_packed_loss_equals_sum_of_document_losses():
    model = tiny()
    x = rand_tokens((1, 20), seed=4)
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    positions = torch.tensor([list(range(8)) + list(range(12))])
    labels = x.clone()
    # the first token of a document is not predicted from the previous one
    labels[0, 8] = IGNORE_INDEX
    with torch.no_grad():
        packed = model.loss(x, labels, positions=positions, doc_ids=doc_ids)
        separate = model.loss(x[:, :8], x[:, :8]) + model.loss(x[:, 8:], x[:, 8:])
    assert abs(packed.item() - separate.item()) <= 1e-4


# ---------------------------------------------------------------- loss

def _labels(x):
    labels = x.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return labels


def test_loss_is_shifted_sum_of_cross_entropy():
    model = tiny()
    x = rand_tokens((2, 16))
    labels = _labels(x)
    with torch.no_grad():
        logits = model(x)
        want = F.cross_entropy(logits[:, :-1].reshape(-1, 80), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        got = model.loss(x, labels)
    assert abs(got.item() - want.item()) <= 1e-4
    n_targets = (labels[:, 1:] != IGNORE_INDEX).sum().item()
    assert n_targets == 30 - 4 - 3 and 1.0 < got.item() / n_targets < 50  # a sum, not a mean


def _loss_and_grads(model, x, labels, chunk_size=0, **kw):
    """The plain loss, or with chunk_size > 0 the chunked one (as train_sft.batch_loss picks)."""
    model.zero_grad()
    if chunk_size:
        loss = chunked_loss(model, x, labels, chunk_size=chunk_size, **kw)
    else:
        loss = model.loss(x, labels, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_full_loss(tie):
    model = tiny(tie_embeddings=tie).train()
    x = rand_tokens((2, 16))
    labels = _labels(x)
    loss, grads = _loss_and_grads(model, x, labels)
    for chunk in (7, 32, 1000):
        chunked, chunked_grads = _loss_and_grads(model, x, labels, chunk_size=chunk)
        assert abs(chunked.item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
        # float32, summed in another order: relative to the gradient's size
        for name, g in grads.items():
            assert (chunked_grads[name] - g).abs().max().item() <= \
                1e-5 * max(1.0, g.abs().max().item()), name
    assert grads["embed_tokens.weight"].abs().max() > 0 and \
        grads["layers.0.attn.q_proj.weight"].abs().max() > 0


def test_grad_checkpointing_same_gradients():
    model = tiny().train()
    x = rand_tokens((2, 16))
    labels = _labels(x)
    loss, grads = _loss_and_grads(model, x, labels)
    model.grad_checkpointing = True
    ckpt_loss, ckpt_grads = _loss_and_grads(model, x, labels, chunk_size=8)
    assert abs(ckpt_loss.item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    for name, g in grads.items():
        assert (ckpt_grads[name] - g).abs().max().item() <= 1e-5, name
    # packed rows go through the checkpointed blocks with their mask
    doc_ids = torch.tensor([[0] * 6 + [1] * 10] * 2)
    positions = torch.tensor([list(range(6)) + list(range(10))] * 2)
    ckpt_loss, ckpt_grads = _loss_and_grads(model, x, labels, positions=positions, doc_ids=doc_ids)
    model.grad_checkpointing = False
    loss, grads = _loss_and_grads(model, x, labels, positions=positions, doc_ids=doc_ids)
    assert abs(ckpt_loss.item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    assert all((ckpt_grads[n] - g).abs().max().item() <= 1e-5 for n, g in grads.items())


def test_init_weights_reproducible():
    a, b = tiny(seed=5), tiny(seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embed_tokens.weight, tiny(seed=6).embed_tokens.weight)
    fresh = Transformer(copy.deepcopy(a.config))
    fresh.init_weights()
    assert torch.equal(fresh.norm.weight, torch.ones(64)) and \
        0.01 < fresh.embed_tokens.weight.std() < 0.03
