"""Adapter files: a LoRA adapter saved apart from its base model, and loaded onto one.

    adapter.safetensors     the LoRA tensors under our names (lora.lora_state_dict)
    adapter_config.json     r, alpha, dropout, targets, rslora, dora, and the base model's config,
                            so that load_adapter refuses a base of another shape

(export.py writes the same adapter in Hugging Face PEFT's layout.)
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from formats.files import save_safetensors, write_json
from errors import UserError
from lora import apply_lora, lora_settings, lora_state_dict

ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# the fields of a model's config that an adapter's tensor shapes depend on
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                "vocab_size")


def save_adapter(model: nn.Module, directory, base_id: dict | None = None):
    """adapter.safetensors (the LoRA tensors) + adapter_config.json (hyperparameters and the base
    model's config, so `load_adapter` can refuse a base of another shape). base_id: optional
    description of the base checkpoint (path, name, ...) stored alongside."""
    directory = Path(directory)
    config = {**lora_settings(model), "base": asdict(model.config)}
    if base_id:
        config["base_id"] = base_id
    save_safetensors(lora_state_dict(model), directory / ADAPTER_TENSORS, metadata={"format": "pt"})
    # written last: its presence means the save finished
    write_json(directory / ADAPTER_CONFIG, config)


def _shape(config: dict) -> str:
    return " ".join(f"{k}={config.get(k)}" for k in SHAPE_FIELDS)


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Apply the adapter saved in `directory` to a base model (in place) and load its tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"adapter directory not found: {directory}")
    for file in (ADAPTER_CONFIG, ADAPTER_TENSORS):
        if not (directory / file).is_file():
            raise UserError(f"{directory}: no {file} (an adapter directory is written by "
                            "save_adapter / train_sft.py)")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        base = config["base"]
        settings = {k: config[k] for k in ("r", "alpha", "dropout", "rslora", "dora")}
        targets = config["targets"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory / ADAPTER_CONFIG}: not an adapter config "
                        f"({type(e).__name__}: {e})") from None
    mine = asdict(model.config)
    if any(base.get(k) != mine[k] for k in SHAPE_FIELDS):
        raise UserError(f"{directory}: the adapter was trained on a base model of shape "
                        f"{_shape(base)}, but this model is {_shape(mine)}")
    from safetensors.torch import load_file
    try:
        tensors = load_file(directory / ADAPTER_TENSORS)
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"{directory / ADAPTER_TENSORS}: not a readable safetensors file "
                        f"({e})") from None
    apply_lora(model, targets, **settings)
    expected = lora_state_dict(model)
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))
        raise UserError(f"{directory}: adapter tensors do not match its config "
                        f"({len(diff)} differ, e.g. {diff[0]})")
    with torch.no_grad():
        for name, t in tensors.items():
            p = model.get_parameter(name)
            if p.shape != t.shape:
                raise UserError(f"{directory}: tensor {name} has shape {tuple(t.shape)}, "
                                f"expected {tuple(p.shape)}")
            p.copy_(t)
    return model
