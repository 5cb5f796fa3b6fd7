"""A 4-bit frozen base: bitsandbytes' ``Params4bit`` (NF4 or FP4, any blocksize, nested absmax
or not) passed as ``weight``. One module for everything the package does with it: detect it,
validate its quant state, give its logical (N, K) shape, dequantize it.

bitsandbytes is optional: nothing here imports it unless a weight already is a ``Params4bit``
(which needs bitsandbytes imported), so ``import lowrank_fused`` never needs it.

``Packed4bit`` is the typed view of a ``Params4bit`` that the backends receive (packed bytes,
code table, absmax and, nested, the second-level state), built once per call by ``packed``: the
Triton kernels dequantize inside their K loops from it, so the dense W never exists there. It
crosses the custom ops as tensors, ints and strings (``op_arguments`` / ``from_op_arguments``), so
a 4-bit call survives torch.compile's tracing.

The math is bitsandbytes' own matmul (``bnb.matmul_4bit``): W = dequantize_4bit(data,
quant_state) in the quant state's dtype, cast to x's dtype; the dense N x K tensor is made per
call, forward and backward, and dropped at once: it is never saved for backward (the
``Params4bit`` itself is, a parameter that holds no activation memory).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

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
    """W as a dense tensor in ``dtype`` for the operator's math: dequantized for a 4-bit weight
    (a ``Packed4bit`` or a ``Params4bit``), else ``weight`` itself."""
    if isinstance(weight, Packed4bit):
        return weight.dequantize(dtype)
    return dequantize(weight, dtype) if is_4bit(weight) else weight


@dataclass(frozen=True)
class Packed4bit:
    """What a kernel needs to dequantize a ``Params4bit`` tile by tile, all on W's device.

    W (N, K) is flattened row-major; element i = n·K + k is the ``i % 2 == 0`` high nibble (else
    the low one) of ``data[i // 2]``, an index into ``code`` (16 fp32 values); its block is
    ``i // blocksize`` (blocks may span rows when blocksize does not divide K). The value is
    ``code[q] · absmax[block]`` in fp32, rounded to ``dtype`` (the quant state's). Nested:
    ``absmax[block] = code2[absmax_q[block]] · absmax2[block // blocksize2] + offset``, each
    step rounded in fp32 (bitsandbytes' order, so no fused multiply-add)."""
    data: Tensor             # uint8, (ceil(N·K / 2),), contiguous
    code: Tensor             # fp32, (16,)
    absmax: Tensor           # fp32 (ceil(N·K / blocksize),), or uint8 when nested
    blocksize: int
    n: int
    k: int
    quant_type: str
    dtype: torch.dtype       # the quant state's dtype: what bitsandbytes dequantizes to
    code2: Optional[Tensor] = None     # nested: fp32 (256,)
    absmax2: Optional[Tensor] = None   # nested: fp32 (ceil(blocks / blocksize2),)
    offset: Optional[Tensor] = None    # nested: fp32 (1,)
    blocksize2: int = 0

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The dense W (N, K) in ``dtype``: bitsandbytes' ``dequantize_4bit`` (its values, in the
        quant state's dtype, then cast), as ``dequantize`` gives them for the ``Params4bit``."""
        try:
            import bitsandbytes.functional as bnb_f
        except ImportError as err:
            raise ImportError("dequantizing a 4-bit weight off the Triton backend uses "
                              "bitsandbytes' dequantize_4bit: pip install bitsandbytes") from err
        state2 = None
        if self.nested:
            state2 = bnb_f.QuantState(absmax=self.absmax2, code=self.code2,
                                      blocksize=self.blocksize2, dtype=torch.float32)
        state = bnb_f.QuantState(absmax=self.absmax, shape=torch.Size((self.n, self.k)),
                                 code=self.code, blocksize=self.blocksize,
                                 quant_type=self.quant_type, dtype=self.dtype,
                                 offset=self.offset, state2=state2)
        dense = bnb_f.dequantize_4bit(self.data.reshape(-1, 1), state)
        return dense if dense.dtype == dtype else dense.to(dtype)

    def op_arguments(self) -> tuple:
        """(data, absmax, code, absmax2, code2, offset, quant_type, blocksize, blocksize2, dtype):
        this view as the custom ops take it (``ops.forward_op``): tensors (the nested ones None
        when not nested), ints, a string and a dtype. ``from_op_arguments`` is the inverse."""
        return (self.data, self.absmax, self.code, self.absmax2, self.code2, self.offset,
                self.quant_type, self.blocksize, self.blocksize2, self.dtype)


def from_op_arguments(data: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                      code2: Optional[Tensor], offset: Optional[Tensor], quant_type: str,
                      blocksize: int, blocksize2: int, dtype: torch.dtype, n: int,
                      k: int) -> Packed4bit:
    """The ``Packed4bit`` that ``Packed4bit.op_arguments`` described, for W of shape (n, k)."""
    return Packed4bit(data=data, code=code, absmax=absmax, blocksize=blocksize, n=n, k=k,
                      quant_type=quant_type, dtype=dtype, code2=code2, absmax2=absmax2,
                      offset=offset, blocksize2=blocksize2)


def packed(weight, name: str = "weight") -> Packed4bit:
    """The ``Packed4bit`` view of a ``Params4bit`` (checked as ``check_4bit`` does, and, nested,
    its second-level state's absmax, code and blocksize): ``ValueError`` naming what is missing.
    Views where the tensors already have the kernels' dtypes (no copy of the packed bytes)."""
    n, k = check_4bit(weight, name)
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnb_f
        data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, state)
    where = f"{name} (a bitsandbytes Params4bit)"
    blocksize = int(state.blocksize)
    if blocksize < 1:
        raise ValueError(f"{where}: quant_state.blocksize must be positive, got {blocksize}")
    blocks = -(-n * k // blocksize)
    fp32 = lambda t: t.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
    data = data.contiguous().reshape(-1).view(torch.uint8)
    code = fp32(state.code)
    if code.numel() != 16:
        raise ValueError(f"{where}: quant_state.code must hold 16 values, got {code.numel()}")
    if state.quant_type == "fp4":
        # bitsandbytes' kernels (CUDA, CPU) take an FP4 value's sign from bit 3 of its index, so
        # index 8 decodes to -0 where the table holds +0: the same zero, signed as they sign it
        code = torch.cat([code[:8], -code[8:].abs()])
    extra = {}
    if getattr(state, "nested", False):
        state2 = state.state2
        missing = [f"state2.{field}" for field in ("absmax", "code", "blocksize")
                   if getattr(state2, field, None) is None]
        if missing:
            raise ValueError(f"{where}: its nested quant_state is missing {', '.join(missing)}")
        absmax = state.absmax.reshape(-1).contiguous()
        if absmax.dtype != torch.uint8:
            raise ValueError(f"{where}: a nested quant_state's absmax must be uint8 (8-bit "
                             f"indices into state2.code), got {absmax.dtype}")
        blocksize2 = int(state2.blocksize)
        extra = dict(code2=fp32(state2.code), absmax2=fp32(state2.absmax),
                     offset=fp32(torch.as_tensor(state.offset, device=data.device)),
                     blocksize2=blocksize2)
        if extra["code2"].numel() != 256 or extra["absmax2"].numel() < -(-blocks // blocksize2):
            raise ValueError(f"{where}: nested quant_state.state2 holds too few values for "
                             f"{blocks} blocks (code {extra['code2'].numel()}, absmax "
                             f"{extra['absmax2'].numel()})")
    else:
        absmax = fp32(state.absmax)
    if absmax.numel() < blocks:
        raise ValueError(f"{where}: quant_state.absmax holds {absmax.numel()} values, fewer "
                         f"than the {blocks} blocks of {blocksize} that shape ({n}, {k}) needs")
    return Packed4bit(data=data, code=code, absmax=absmax, blocksize=blocksize, n=n, k=k,
                      quant_type=state.quant_type, dtype=state.dtype, **extra)


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
