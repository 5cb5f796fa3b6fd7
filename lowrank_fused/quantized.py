"""A 4-bit frozen base: bitsandbytes' ``Params4bit`` (NF4 or FP4, any blocksize, nested absmax
or not) passed as ``weight``. One module for everything the package does with it: detect it,
validate its quant state, give its logical (N, K) shape, dequantize it.

bitsandbytes is optional: nothing here imports it unless a weight already is a ``Params4bit``
(which needs bitsandbytes imported), so ``import lowrank_fused`` never needs it.

The math is bitsandbytes' own matmul (``bnb.matmul_4bit``): W = dequantize_4bit(data,
quant_state) in the quant state's dtype, cast to x's dtype; the dense N x K tensor is made per
call, forward and backward, and dropped at once: it is never saved for backward (the
``Params4bit`` itself is, a parameter that holds no activation memory).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

QUANT_TYPES = ("nf4", "fp4")


def is_4bit(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Params4bit`` (without importing bitsandbytes)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return False
    cls = getattr(bnb_nn, "Params4bit", None)
    return cls is not None and isinstance(weight, cls)


def check_4bit(weight, name: str = "weight") -> tuple[int, int]:
    """Validate a ``Params4bit``'s quant state; returns its (N, K). ``ValueError`` naming what is
    missing or wrong (a weight built without quantizing, a state without absmax, ...)."""
    state = getattr(weight, "quant_state", None)
    where = f"{name} (a bitsandbytes Params4bit)"
    if state is None:
        raise ValueError(f"{where} has no quant_state: it was never quantized. Move it to its "
                         "device (.to(device) quantizes it) or build the layer with "
                         "bitsandbytes.nn.Linear4bit")
    missing = [field for field in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype")
               if getattr(state, field, None) is None]
    if getattr(state, "nested", False):
        missing += [f"{field} (nested absmax)" for field in ("offset", "state2")
                    if getattr(state, field, None) is None]
    if missing:
        raise ValueError(f"{where}: its quant_state is missing {', '.join(missing)}")
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}: quant_state.quant_type must be one of {QUANT_TYPES}, got "
                         f"{state.quant_type!r}")
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise ValueError(f"{where}: quant_state.shape must be 2-D (N, K), got {shape}")
    n, k = int(shape[0]), int(shape[1])
    if weight.numel() * weight.element_size() * 2 < n * k:
        raise ValueError(f"{where}: holds {weight.numel() * weight.element_size()} bytes, fewer "
                         f"than the {(n * k + 1) // 2} that quant_state.shape {shape} needs")
    if state.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{where}: quant_state.dtype must be a floating dtype, got {state.dtype}")
    return n, k


def shape(weight) -> tuple[int, int]:
    """(N, K) of a ``Params4bit`` (its data is packed: N·K/2 bytes), or of a dense weight."""
    if is_4bit(weight):
        n, k = weight.quant_state.shape
        return int(n), int(k)
    return tuple(weight.shape)


def dequantize(weight, dtype: torch.dtype) -> Tensor:
    """The dense W (N, K) in ``dtype``, by bitsandbytes' own function (as ``bnb.matmul_4bit``).
    A transient: callers use it and drop it. A dense weight comes back as it is."""
    if not is_4bit(weight):
        return weight
    import bitsandbytes.functional as bnb_f

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a CPU weight for its inference kernel (eval, no grad): undo it
        # on a copy, the module keeps its layout
        data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, state)
    dense = bnb_f.dequantize_4bit(data.reshape(-1, 1), state)
    return dense if dense.dtype == dtype else dense.to(dtype)


def dense_like(weight, dtype: torch.dtype) -> Tensor:
    """W as a dense tensor in ``dtype`` for the operator's math: dequantized for a 4-bit weight,
    else ``weight`` itself."""
    return dequantize(weight, dtype) if is_4bit(weight) else weight


def describe(weight) -> str:
    """e.g. "Params4bit nf4, blocksize 64, nested absmax, bfloat16, shape (N, K)"."""
    state = weight.quant_state
    return (f"Params4bit {state.quant_type}, blocksize {state.blocksize}"
            f"{', nested absmax' if getattr(state, 'nested', False) else ''}, "
            f"{str(state.dtype).replace('torch.', '')}, shape {tuple(state.shape)}")


def is_linear4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (Linear4bit, LinearNF4,
    LinearFP4), without importing bitsandbytes."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    cls = getattr(bnb_nn, "Linear4bit", None) if bnb_nn is not None else None
    return cls is not None and isinstance(module, cls)


def compute_dtype_of(module) -> torch.dtype:
    """The dtype a bitsandbytes Linear4bit computes in: its compute_dtype, else the weight's
    quant-state dtype (what bitsandbytes falls back to)."""
    return module.compute_dtype or module.weight.quant_state.dtype
