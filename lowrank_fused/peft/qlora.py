"""PEFT's QLoRA layer served: ``FusedLoraLinear4bit``, a subclass of
``peft.tuners.lora.bnb.Linear4bit`` (a LoRA layer over a bitsandbytes ``Linear4bit``) that
overrides only ``forward``. Imported by ``serving`` only when bitsandbytes is installed.

The forward does what bitsandbytes' ``Linear4bit.forward`` does for the base (x cast to the
compute dtype, bias too, y cast back to x's dtype) and hands the 4-bit ``Params4bit`` to the
operator as it is: on CUDA tensors the Triton backend dequantizes it inside its GEMMs' K loops,
on the reference path it is dequantized per call, forward and backward, as ``bnb.matmul_4bit``
does; nothing dense is saved. Unlike PEFT's forward it does not clone
the base output nor cast x to the adapters' fp32 (a full-width copy that a trainable A keeps):
the operator casts x to the adapters' dtype inside its own pass and keeps x only for a trainable
A, P = dropout(x)·Aᵀ otherwise. Where x must be cast to the compute dtype (an fp32 model over a
bf16-computing 4-bit base), sibling layers reading the same x share one cast (``input_cast``).
"""
from __future__ import annotations

from peft.tuners.lora.bnb import Linear4bit

from .input_cast import shared_cast
from .serving import ServedLayer, fused_forward


class FusedLoraLinear4bit(ServedLayer, Linear4bit):
    """PEFT's LoRA Linear4bit whose forward runs ``low_rank_linear`` over the 4-bit base. Made
    by ``enable_fused``, never directly."""

    _peft_class = Linear4bit

    def _served_forward(self, x, peft_forward):
        base = self.get_base_layer()
        if base.compute_dtype is None:  # bitsandbytes sets it on its first call, from x
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute = base.compute_dtype or x.dtype
        bias = base.bias
        if bias is not None and bias.dtype != compute:
            bias = bias.to(compute)
        x_c = shared_cast(x, compute)  # q/k/v (gate/up) share one cast copy
        y = fused_forward(self, x_c, lambda _: peft_forward(x), base.weight, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)
