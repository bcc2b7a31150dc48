"""LoRA: exactness at init, merge/unmerge, what trains, adapter files, and the HF / PEFT exports
(checked against transformers and peft themselves, when installed)."""
import json
import math

import pytest
import torch
import torch.nn as nn

from formats.checkpoint import load_checkpoint, save_hf_checkpoint
from errors import UserError
from export import export_hf, export_peft
from formats.adapter import load_adapter, save_adapter
from lora import (LoRALinear, apply_lora, count_parameters, lora_layers, lora_settings,
                  lora_state_dict, merge_lora, parse_targets)
from model import ModelConfig, Transformer
from projections import is_target, replace_module

TINY = ModelConfig.from_name("tiny")  # dim 64, 4 heads, 2 kv heads, untied
GQA_TIED = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=128,
                       tie_embeddings=True)
CONFIGS = {"tiny": TINY, "gqa_tied": GQA_TIED}


def base_model(config, seed=0):
    model = Transformer(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


def tokens_for(config, seed=1, shape=(2, 12)):
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=1e-2):
    """A few AdamW steps on random tokens, so that B (and DoRA's magnitude) move away from init."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        tokens = tokens_for(model.config, seed=100 + step, shape=(2, 16))
        (model.loss(tokens, tokens) / tokens.numel()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def lora_model(config, targets="all,head", dora=False, **kw):
    torch.manual_seed(0)  # lora_A's random init
    return train_steps(apply_lora(base_model(config), targets, r=4, alpha=8, dora=dora, **kw))


def logits(model, config):
    with torch.no_grad():
        return model(tokens_for(config)).float()


# ---------------------------------------------------------------- targets, scale, dropout

def test_parse_targets():
    assert parse_targets("q,v") == ["q", "v"]
    assert parse_targets(" Q , v ,q") == ["q", "v"]
    assert parse_targets("all") == ["q", "k", "v", "o", "gate", "up", "down"]
    assert parse_targets("all,head") == ["q", "k", "v", "o", "gate", "up", "down", "head"]
    valid = "valid: q, k, v, o, gate, up, down, head"
    with pytest.raises(UserError, match=f"unknown LoRA target 'qkv'.*{valid}"):
        parse_targets("q,qkv")
    with pytest.raises(UserError, match="no LoRA targets"):
        parse_targets(" , ")


def test_module_paths():
    assert is_target("layers.3.attn.q_proj", ["mlp.up_proj", "attn.q_proj"])
    assert is_target("lm_head", ["lm_head"])
    assert not is_target("layers.3.xattn.q_proj", ["attn.q_proj"])  # whole names only
    assert not is_target("layers.3.attn", ["attn.q_proj"])
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3)))
    replace_module(model, "1.0", nn.Identity())
    assert isinstance(model[1][0], nn.Identity)


def test_scale_rslora():
    assert LoRALinear(nn.Linear(8, 8), r=4, alpha=8).scale == 2.0
    assert LoRALinear(nn.Linear(8, 8), r=4, alpha=8, rslora=True).scale == 4.0  # alpha / sqrt(r)
    model = apply_lora(base_model(TINY), "q", r=16, alpha=8, rslora=True)
    assert model.layers[0].attn.q_proj.scale == 8 / math.sqrt(16)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, bias=True), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    expected = layer.base(x) + layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)
    layer.eval()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), expected, atol=1e-3)


# ---------------------------------------------------------------- exactness, training, merging

@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_fresh_adapter_changes_nothing(name, dora):
    config = CONFIGS[name]
    before = logits(base_model(config), config)
    model = apply_lora(base_model(config), "all,head", r=4, alpha=8, dora=dora)
    assert torch.equal(logits(model, config), before)  # B = 0 (and m = ‖W‖): bit for bit


def test_only_lora_trains():
    config = TINY
    r = 4
    model = apply_lora(base_model(config), "q,v,down,head", r=r, alpha=8)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    d = config.dim
    kv = config.n_kv_heads * config.head_dim
    h = config.ffn_hidden
    per_layer = r * (d + d) + r * (d + kv) + r * (h + d)  # q, v, down: r·(in + out) each
    trainable, total = count_parameters(model)
    assert trainable == config.n_layers * per_layer + r * (d + config.vocab_size)
    assert total == sum(p.numel() for p in base_model(config).parameters()) + trainable
    assert lora_settings(model) == {"r": 4, "alpha": 8, "dropout": 0.0,
                                    "targets": ["q", "v", "down", "head"],
                                    "rslora": False, "dora": False}
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == set(lora_state_dict(model))

    tokens = tokens_for(config)
    model.train()
    model.loss(tokens, tokens).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    train_steps(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_merge_unmerge(name, dora):
    config = CONFIGS[name]
    model = lora_model(config, dora=dora)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, config)
    for layer in lora_layers(model).values():
        layer.merge()
        layer.merge()  # a second merge must not add ΔW twice
    assert torch.allclose(logits(model, config), unmerged, atol=1e-5)
    for layer in lora_layers(model).values():
        layer.unmerge()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6, rtol=0), k
    assert torch.allclose(logits(model, config), unmerged, atol=1e-6)

    embedding = model.embed_tokens.weight.clone()
    merged = merge_lora(model)
    assert type(merged) is Transformer and not lora_layers(merged)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base_model(config).state_dict())
    assert torch.allclose(logits(merged, config), unmerged, atol=1e-5)
    # a tied head's update stays out of the embedding
    assert torch.equal(merged.embed_tokens.weight, embedding)
    assert all(p.requires_grad for p in merged.parameters())


# ---------------------------------------------------------------- adapter files

@pytest.mark.parametrize("dora", [False, True])
def test_adapter_roundtrip(tmp_path, dora):
    config = GQA_TIED
    model = lora_model(config, targets="q,k,v,head", dora=dora, dropout=0.1, rslora=True)
    save_adapter(model, tmp_path / "adapter", base_id={"checkpoint": "random"})
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["targets"] == ["q", "k", "v", "head"] and saved["r"] == 4 and saved["alpha"] == 8
    assert saved["dora"] is dora and saved["rslora"] is True and saved["dropout"] == 0.1
    assert saved["base"]["dim"] == 64 and saved["base_id"] == {"checkpoint": "random"}

    fresh = load_adapter(base_model(config), tmp_path / "adapter").eval()
    assert torch.equal(logits(fresh, config), logits(model, config))
    assert fresh.lm_head.base.weight is fresh.embed_tokens.weight  # still tied


def test_adapter_errors(tmp_path):
    model = apply_lora(base_model(TINY), "q,v", r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(UserError, match=r"shape dim=64 .*ffn_hidden=172 vocab_size=512, but "
                                        r"this model is dim=64 .*ffn_hidden=96 vocab_size=128"):
        load_adapter(base_model(GQA_TIED), tmp_path / "adapter")
    with pytest.raises(UserError, match="adapter directory not found"):
        load_adapter(base_model(TINY), tmp_path / "nowhere")
    (tmp_path / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter.safetensors"):
        load_adapter(base_model(TINY), tmp_path / "adapter")
    with pytest.raises(UserError, match="already has LoRA layers"):
        apply_lora(model, "k")


# ---------------------------------------------------------------- HF and PEFT exports (oracles)

def hf_logits(hf_model, config):
    with torch.no_grad():
        return hf_model(tokens_for(config)).logits.float()


@pytest.mark.parametrize("name,targets", [("tiny", "all"), ("gqa_tied", "q,k,o,head")])
def test_export_hf(tmp_path, name, targets):
    config = CONFIGS[name]
    model = lora_model(config, targets=targets)
    expected = logits(model, config)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"not a real tokenizer")
    export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"not a real tokenizer"

    ours, _ = load_checkpoint(tmp_path / "hf")
    assert torch.allclose(logits(ours.eval(), config), expected, atol=1e-5)

    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert torch.allclose(hf_logits(hf, config), expected, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name,targets", [("tiny", "all"), ("gqa_tied", "q,k,v,head")])  # tied head
def test_export_peft(tmp_path, name, targets, dora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = CONFIGS[name]
    base = base_model(config)
    # before LoRA: the base PEFT will load the adapter onto (lora_model rebuilds the same base)
    save_hf_checkpoint(base, tmp_path / "base")
    model = lora_model(config, targets=targets, dora=dora, rslora=dora)
    export_peft(model, tmp_path / "peft", base_model_name_or_path="random-tiny")

    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    magnitude = "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"
    assert (magnitude in keys) is dora
    assert torch.allclose(hf_logits(hf, config), logits(model, config), atol=1e-4)
