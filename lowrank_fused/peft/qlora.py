"""PEFT's QLoRA layer served: ``FusedLoraLinear4bit``, a subclass of
``peft.tuners.lora.bnb.Linear4bit`` (a LoRA layer over a bitsandbytes ``Linear4bit``) that
overrides only ``forward`` (``serving.forward_over_4bit``: the 4-bit ``Params4bit`` goes to the
operator as it is; on CUDA tensors the Triton backend dequantizes it inside its GEMMs' K loops,
on the reference path per call, forward and backward, as ``bnb.matmul_4bit`` does; nothing
dense is saved). Importable only with bitsandbytes; ``enable`` imports it when it meets such a
layer.
"""
from __future__ import annotations

from peft.tuners.lora.bnb import Linear4bit

from .serving import ServedLayer, forward_over_4bit


class FusedLoraLinear4bit(ServedLayer, Linear4bit):
    """PEFT's LoRA Linear4bit whose forward runs ``low_rank_linear`` over the 4-bit base. Made
    by ``enable_fused``, never directly."""

    _peft_class = Linear4bit

    def _served_forward(self, x, peft_forward):
        return forward_over_4bit(self, x, peft_forward)
