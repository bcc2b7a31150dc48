"""Exports for where people run models: the Hugging Face stack, llama.cpp and Ollama.

    out/peft/  adapter_config.json + adapter_model.safetensors
               loaded by peft.AutoPeftModelForCausalLM.from_pretrained("out/peft")
    out/hf/    config.json + model.safetensors + generation_config.json + tokenizer files
               loaded by AutoModelForCausalLM.from_pretrained("out/hf")
    FILE.gguf  the merged model for llama.cpp, Ollama, LM Studio, with a Modelfile beside it:
               python export.py RUN_DIR --gguf model.gguf --type q4_k_m

For Hugging Face two things differ from our own files: the names (`model.layers.0.self_attn.q_proj`
for our `layers.0.attn.q_proj`), and the row order of q_proj/k_proj (checkpoint.hf_permute). The
GGUF export (gguf_write.py, gguf_quant.py, modelfile.py) merges the adapter one tensor at a time
as it writes, so it never holds the model in memory.
"""
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

from formats.checkpoint import hf_names, hf_permute, save_hf_checkpoint
from errors import ArgumentParser, UserError, run_cli
from formats.files import atomic_write, read_json, save_safetensors, write_json
from lora import HF_TARGET_NAMES, lora_layers, lora_settings, merge_lora
from formats.modelfile import end_ids, template_end_id

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


def export_hf(model: nn.Module, directory, tokenizer=None, tokenizer_dir=None, dtype=None,
              template_name=None):
    """Merge the adapters and write a Hugging Face LlamaForCausalLM directory, plus the tokenizer
    files (tokenizer.model, tokenizer.json, ...) that exist in `tokenizer_dir` (or that one file),
    and those `tokenizer.save` writes (for a tokenizer read from a GGUF file: tokenizer.json and
    tokenizer_config.json with the chat template), and with a tokenizer generation_config.json
    (every end id of the tokenizer and of the chat template `template_name`).

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
    from speed.quant import dequantize_model  # (QLoRA: 4-bit weights cannot hold W + ΔW)
    merge_lora(dequantize_model(model))
    save_hf_checkpoint(model, directory, dtype=dtype)
    for f in tokenizer_files:
        atomic_write(Path(directory) / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
    if tokenizer is not None:
        tokenizer.save(directory)
        write_generation_config(directory, tokenizer, template_name)
    return model


# ---------------------------------------------------------------- where generation ends

def write_generation_config(directory, tokenizer, template_name: str | None):
    """generation_config.json: transformers' generate() stops at any of eos_token_id, so it
    gets every end id (without it, it runs past <|im_end|> into a new turn)."""
    config = {"bos_token_id": tokenizer.bos_id, "eos_token_id": end_ids(tokenizer, template_name)}
    if tokenizer.eos_id is not None:
        config["pad_token_id"] = tokenizer.eos_id
    write_json(Path(directory) / "generation_config.json", config)


# ---------------------------------------------------------------- GGUF

def merged_tensors(checkpoint, adapter=None):
    """(config, iterator of (our name, tensor)) of the merged model, read one tensor at a time:
    each weight with an adapter is folded in float32 (W + s·B A, or DoRA's rescaled rows, by the
    adapter layer's own merged_weight) as it is read; the others stay in the checkpoint's dtype.
    A tied head with an adapter becomes its own matrix: the config then says untied."""
    from formats.checkpoint import _unneeded, read_checkpoint
    config, tensors = read_checkpoint(checkpoint)
    layers, settings = {}, None
    if adapter is not None:
        layers, settings = _adapter_tensors(adapter, config)
    head_adapter = config.tie_embeddings and "lm_head" in layers
    out_config = replace(config, tie_embeddings=False) if head_adapter else config

    def merged():
        for _, name, t in tensors:
            if _unneeded(name, config):
                continue
            yield name, _merge(t, name, layers, settings)
            if head_adapter and name == "embed_tokens.weight":
                yield "lm_head.weight", _merge(t, "lm_head.weight", layers, settings)
    return out_config, merged()


def _adapter_tensors(directory, config):
    """{module name: {"lora_A": ..., "lora_B": ..., "magnitude": ...}} and the adapter's
    settings, after load_adapter's checks (an adapter of another model's shape is refused)."""
    from formats.adapter import ADAPTER_CONFIG, ADAPTER_TENSORS, SHAPE_FIELDS
    from safetensors.torch import load_file
    directory = Path(directory)
    for file in (ADAPTER_CONFIG, ADAPTER_TENSORS):
        if not (directory / file).is_file():
            raise UserError(f"{directory}: no {file} (an adapter directory is written by "
                            "train_sft.py)")
    adapter_config = json.loads((directory / ADAPTER_CONFIG).read_text())
    mine = asdict(config)
    base = adapter_config.get("base", {})
    if any(base.get(k) != mine[k] for k in SHAPE_FIELDS):
        raise UserError(f"{directory}: the adapter was trained on a base model of another shape")
    layers = {}
    for key, t in load_file(directory / ADAPTER_TENSORS).items():
        module, _, part = key.rpartition(".")
        layers.setdefault(module, {})[part] = t.float()
    return layers, adapter_config


def _merge(weight, name, layers, settings):
    """The weight with its adapter folded in, computed by a LoRALinear/DoRALinear built around
    it (the one place the merge formula lives); the weight itself if it has no adapter."""
    from lora import DoRALinear, LoRALinear
    module = name.removesuffix(".weight")
    if module not in layers:
        return weight
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    base.weight = nn.Parameter(weight.float(), requires_grad=False)
    kind = DoRALinear if settings["dora"] else LoRALinear
    layer = kind(base, settings["r"], settings["alpha"], settings["dropout"], settings["rslora"])
    with torch.no_grad():
        for part, t in layers[module].items():
            getattr(layer, part).copy_(t)
    return layer.merged_weight()


def export_gguf(checkpoint, path, tokenizer, file_type="f16", adapter=None,
                template_name=None, chat_template=None, name="model"):
    """Write the merged model as a GGUF file, tensor by tensor (gguf_write.write_gguf), with
    the tokenizer, the chat template and every end token in its metadata."""
    from formats.gguf_write import (gguf_names, model_metadata, rope_factors, tensor_plan,
                                    tokenizer_metadata, write_gguf)
    config, tensors = merged_tensors(checkpoint, adapter)
    metadata = {**model_metadata(config, file_type, name),
                **tokenizer_metadata(tokenizer, chat_template,
                                     template_end_id(tokenizer, template_name))}
    names = gguf_names(config)

    def in_file_names():
        if config.rope_scaling:
            yield "rope_freqs.weight", rope_factors(config)
        for ours, t in tensors:
            if ours in names:
                yield names[ours], t
    write_gguf(path, metadata, tensor_plan(config, file_type), in_file_names())
    return config


# ---------------------------------------------------------------- the command line

def parse_args(argv=None):
    from templates import TEMPLATES
    from formats.gguf_write import FILE_TYPES
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("source", help="a training run's --out directory (its model/, or its adapter/ on its base "
      "model), or a checkpoint directory or file (HF, Meta, llama2.c, GGUF, ours)")
    a("--gguf", help="write the merged model to this .gguf file, and a Modelfile for Ollama "
      "beside it (default: none)")
    a("--type", default="f16", choices=list(FILE_TYPES),
      help="GGUF weight type: floats, or a llama.cpp quantisation (q4_k_m: Q4_K with Q6_K where "
      "llama-quantize puts it)")
    a("--adapter", help="LoRA adapter directory applied to a checkpoint SOURCE (default: none; a "
      "run brings its own)")
    a("--tokenizer", help="tokenizer path (default: the one of the run or the checkpoint)")
    a("--template", choices=list(TEMPLATES), help="chat format for the Modelfile and the end "
      "tokens (default: the run's --template, else recognised in the chat template)")
    a("--force", action="store_true", help="replace an existing --gguf file (default: refuse)")
    a("--peft-base", action="store_true", help="for a run on a non-Hugging-Face base (a GGUF): "
      "write the base as a Hugging Face directory RUN/peft-base and point RUN/peft at it, so "
      "PEFT can load the adapter (default: off)")
    args = p.parse_args(argv)
    if not args.gguf and not args.peft_base:
        raise UserError("nothing to do: give --gguf FILE and/or --peft-base")
    return args


def main(argv=None):
    import argparse
    from generate import resolve_run_dir
    from run.run_dir import run_config
    from tokenizer import ByteTokenizer, checkpoint_tokenizer
    args = parse_args(argv)
    run = run_config(args.source)
    resolve = argparse.Namespace(checkpoint=args.source, adapter=args.adapter,
                                 tokenizer=args.tokenizer)
    checkpoint, adapter, tokenizer, _ = resolve_run_dir(resolve)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer = checkpoint_tokenizer(checkpoint, tokenizer)
    if args.peft_base:
        write_peft_base(Path(args.source), run, checkpoint, tokenizer)
    if args.gguf:
        gguf = Path(args.gguf)
        if gguf.exists() and not args.force:
            raise UserError(f"{gguf} exists; pass --force to replace it")
        template_name, chat_template = chat_format(run, args.template, tokenizer)
        config = export_gguf(checkpoint, gguf, tokenizer, args.type, adapter, template_name,
                             chat_template, name=gguf.stem)
        from formats.modelfile import write_modelfile
        modelfile = write_modelfile(gguf, tokenizer, template_name)
        print(f"wrote {gguf} ({args.type}, {config.n_layers} layers, "
              f"{gguf.stat().st_size / 2**20:.1f} MiB) and {modelfile}")
        print(f"run it: llama-cli -m {gguf} -cnv   or   ollama create {gguf.stem} -f {modelfile} "
              f"&& ollama run {gguf.stem}")


def chat_format(run: dict | None, template_name: str | None, tokenizer):
    """(the template's name in templates.TEMPLATES or None, the jinja chat template or None).
    A run's config.json "template" is a name or, in newer runs, the jinja source; else the
    tokenizer's own chat_template, whose format is recognised by its markers."""
    from templates import TEMPLATES
    recorded = (run or {}).get("template")
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(recorded, str) and ("{%" in recorded or "{{" in recorded):
        chat_template = recorded
    elif template_name is None and recorded in TEMPLATES:
        template_name = recorded
    if template_name is None and chat_template:
        markers = {"<|im_start|>": "chatml", "<|start_header_id|>": "llama3-chat",
                   "[INST]": "llama2-chat"}
        template_name = next((name for marker, name in markers.items()
                              if marker in chat_template), None)
    return template_name, chat_template


def write_peft_base(run_path: Path, run: dict | None, checkpoint, tokenizer):
    """PEFT loads an adapter's base by the path in adapter_config.json, and only a Hugging Face
    model: for a run on a GGUF (or Meta, llama2.c) base, write the base once as RUN/peft-base
    (float32: a dequantised GGUF is not rounded again) and point RUN/peft at it."""
    peft_config = run_path / "peft" / "adapter_config.json"
    if run is None or not peft_config.is_file():
        raise UserError(f"--peft-base needs a finished LoRA run with a peft/ directory; "
                        f"{run_path} is not one")
    from formats.checkpoint import load_checkpoint
    base_dir = run_path / "peft-base"
    model, _ = load_checkpoint(checkpoint)
    export_hf(model, base_dir, tokenizer)
    config = read_json(peft_config)
    config["base_model_name_or_path"] = str(base_dir.resolve())
    write_json(peft_config, config)
    print(f"wrote the base model to {base_dir}; {run_path / 'peft'} now names it")


def peft_base_path(checkpoint) -> str:
    """What PEFT's adapter_config.json names as the base: an absolute path, so the adapter loads
    from any directory. PEFT loads only a Hugging Face directory: for other formats (a GGUF),
    `export.py RUN --peft-base` writes one and points the adapter at it."""
    if checkpoint is None:
        return "demo"
    return str(Path(checkpoint).resolve())


def peft_base_note(checkpoint, out) -> str:
    """A hint after the adapter's path when PEFT cannot load the base as it is."""
    if checkpoint is None or (Path(checkpoint) / "config.json").is_file():
        return ""
    return (f"; for PEFT, whose loader reads only Hugging Face models, write the base beside it "
            f"once: python export.py {out} --peft-base")


if __name__ == "__main__":
    run_cli(main)
