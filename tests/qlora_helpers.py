"""4-bit (bitsandbytes) bases for the QLoRA tests: quantize nn.Linear layers in place."""
import torch
from torch import nn

import bitsandbytes as bnb


def linear4bit(linear: nn.Linear, quant_type="nf4", blocksize=64, nested=False,
               compute_dtype=torch.float32) -> "bnb.nn.Linear4bit":
    """A bitsandbytes Linear4bit holding ``linear``'s weight (quantized) and bias."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type=quant_type,
                          compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(linear.weight.detach().to(compute_dtype).clone(),
                                 requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                                 compress_statistics=nested)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return q.to("cpu")  # .to() quantizes


def quantize_model(model: nn.Module, names=None, **options) -> nn.Module:
    """Replace (in place) every nn.Linear whose name ends with one of ``names`` (all when None)
    by a Linear4bit; marks the model as loaded in 4 bits, as transformers does, so PEFT builds its
    Linear4bit LoRA layers."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and (names is None or name.split(".")[-1] in names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, linear4bit(module, **options))
    model.is_loaded_in_4bit = True
    return model
