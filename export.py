"""Exports for the Hugging Face stack: a LoRA adapter as PEFT writes it, a merged model as
transformers writes it (with the tokenizer files, so AutoTokenizer loads it too).

    out/peft/  adapter_config.json + adapter_model.safetensors
               loaded by peft.PeftModel.from_pretrained(base, "out/peft")
    out/hf/    config.json + model.safetensors + tokenizer files
               loaded by AutoModelForCausalLM.from_pretrained("out/hf")

Two things differ from our own files: the names (`model.layers.0.self_attn.q_proj` for our
`layers.0.attn.q_proj`), and the row order of q_proj/k_proj (checkpoint.hf_permute).
"""
import shutil
from pathlib import Path

import torch.nn as nn

from checkpoint import (atomic_write, hf_names, hf_permute, read_json, save_hf_checkpoint,
                        save_safetensors, write_json)
from errors import UserError
from lora import HF_TARGET_NAMES, lora_layers, lora_settings, merge_lora

# Hugging Face tokenizer files copied from the base checkpoint's directory when it has them
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def export_peft(model: nn.Module, directory, base_model_name_or_path: str = ""):
    """Write the adapter as Hugging Face PEFT does (adapter_config.json +
    adapter_model.safetensors), loadable with
    `peft.PeftModel.from_pretrained(LlamaForCausalLM..., directory)`.

    Our q_proj/k_proj rows are in Meta's RoPE pair order and HF's are permuted
    (checkpoint.hf_permute): W_hf = P W, so ΔW_hf = P B A, i.e. B's rows (and DoRA's per-row
    magnitude) get the same permutation while A, whose columns are input features, stays as it is.
    """
    settings = lora_settings(model)
    c = model.config
    to_hf = {ours: theirs for theirs, ours in hf_names(c.n_layers).items()}
    tensors = {}
    for name, layer in lora_layers(model).items():
        key = "base_model.model." + to_hf[name + ".weight"].removesuffix(".weight")
        lora_B = layer.lora_B.detach()
        magnitude = None
        if settings["dora"]:
            magnitude = layer.magnitude.detach()[:, None]  # 2-D for hf_permute
        if name.endswith(("q_proj", "k_proj")):
            n_heads = c.n_heads if name.endswith("q_proj") else c.n_kv_heads
            lora_B = hf_permute(lora_B, n_heads, to_hf=True)
            if magnitude is not None:
                magnitude = hf_permute(magnitude, n_heads, to_hf=True)
        tensors[key + ".lora_A.weight"] = layer.lora_A.detach()
        tensors[key + ".lora_B.weight"] = lora_B
        if magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = magnitude[:, 0]
    # 'q' -> 'q_proj', 'head' -> 'lm_head'
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "r": settings["r"],
              "lora_alpha": settings["alpha"],
              "lora_dropout": settings["dropout"],
              "target_modules": [HF_TARGET_NAMES[t] for t in settings["targets"]],
              "use_rslora": settings["rslora"],
              "use_dora": settings["dora"],
              "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path}
    directory = Path(directory)
    save_safetensors(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(directory / "adapter_config.json", config)


def write_chat_template(directory, chat_template: str | None):
    """The template a run was trained with goes into directory/tokenizer_config.json (made if
    absent), so that the model is prompted after export as it was trained; None (a named
    template without a jinja form) takes out one that the base model's files brought."""
    path = Path(directory) / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    if config.get("chat_template") == chat_template:
        return
    if chat_template is None:
        del config["chat_template"]
    else:
        config["chat_template"] = chat_template
    write_json(path, config)


def export_hf(model: nn.Module, directory, tokenizer=None, tokenizer_dir=None, dtype=None):
    """Merge the adapters and write a Hugging Face LlamaForCausalLM directory, plus the tokenizer
    files (tokenizer.model, tokenizer.json, ...) that exist in `tokenizer_dir` (or that one file),
    and those `tokenizer.save` writes (for a tokenizer read from a GGUF file: tokenizer.json and
    tokenizer_config.json with the chat template).

    This MUTATES `model`: its LoRA layers are merged and removed (see merge_lora). A model
    without LoRA layers (full fine-tuning) is written as it is.
    """
    tokenizer_files = []
    if tokenizer_dir is not None:  # checked before anything is merged or written
        source = Path(tokenizer_dir)
        if not source.exists():
            raise UserError(f"tokenizer directory not found: {source}")
        if source.is_file():
            tokenizer_files = [source]
        else:
            tokenizer_files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
    from quant import dequantize_model  # (QLoRA: 4-bit weights cannot hold W + ΔW)
    merge_lora(dequantize_model(model))
    save_hf_checkpoint(model, directory, dtype=dtype)
    for f in tokenizer_files:
        atomic_write(Path(directory) / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
    if tokenizer is not None:
        tokenizer.save(directory)
    return model
