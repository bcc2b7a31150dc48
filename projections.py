"""The seven linear projections of a Transformer block: the layers that LoRA adapts (lora.py)
and QLoRA stores in 4 bits (quant.py). Their names, how a module is matched to one, and how one
is swapped for another module. Both files need these and neither needs the other, so they live
here, below both.
"""
import torch.nn as nn

# short name (as on the command line) -> the module's path inside a block (model.py)
PROJECTIONS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def is_target(module_name: str, paths) -> bool:
    """Whether the module called `module_name` is at one of `paths`, in a block or not:
    'layers.3.attn.q_proj' is at 'attn.q_proj' and 'lm_head' at 'lm_head'. Whole names only:
    'layers.3.xattn.q_proj' is not at 'attn.q_proj'."""
    return any(module_name == path or module_name.endswith("." + path) for path in paths)


def replace_module(model: nn.Module, name: str, new: nn.Module):
    """Put `new` where the submodule called `name` (e.g. 'layers.0.attn.q_proj') is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)  # get_submodule("") is the model itself
