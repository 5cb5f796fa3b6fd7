"""Checks on the operator's inputs; each error names what was expected and what came."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .quantized import Packed4bit

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_rank(rank, out_features: int, in_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    limit = min(out_features, in_features)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be between 1 and min(out_features, in_features) = {limit}, got {rank}"
        )


def check_dropout_p(p, name: str = "dropout_p") -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__} {p!r}")
    if not 0.0 <= float(p) < 1.0:  # NaN fails this too
        raise ValueError(f"{name}: the dropout probability must be in [0, 1), got {p}")


SEED_LIMIT = 2**63  # seeds travel as int64


def check_call_arguments(x, scaling, dropout_seed) -> None:
    """The operator's non-tensor arguments and x's type, before anything touches them. Plain
    Python checks: a tensor ``scaling`` costs one sync, as converting it to float does anyway."""
    # scaling - scaling == 0 says finite (NaN and inf give NaN) in comparisons, which dynamo
    # traces on a symbolic float too (dynamic=True), where math.isfinite breaks the graph
    if type(scaling) is float and dropout_seed is None and isinstance(x, Tensor) \
            and scaling - scaling == 0.0:
        return  # the common call, without the numbers-ABC checks below (per-call overhead)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}"
                        + (" (convert it with torch.from_numpy or torch.as_tensor)"
                           if type(x).__module__ == "numpy" else ""))
    check_scaling(scaling)
    check_dropout_seed(dropout_seed)  # dropout_p: in check_operator_inputs


def check_scaling(scaling) -> None:
    if isinstance(scaling, Tensor):
        if scaling.requires_grad:
            raise ValueError("scaling must not require grad: the operator has no gradient for "
                             "it and would detach it silently; pass a float or a tensor that "
                             "does not require grad")
        if scaling.numel() != 1:
            raise ValueError(f"scaling must be a number or a 1-element tensor, got a tensor of "
                             f"shape {tuple(scaling.shape)}")
        value = float(scaling)
    elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number (a float such as alpha / r), got "
                        f"{type(scaling).__name__} {scaling!r}")
    else:
        value = float(scaling)
    if not math.isfinite(value):
        raise ValueError(f"scaling must be finite, got {value}")


def check_dropout_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"dropout_seed must be None or an int in [0, 2**63), got "
                        f"{type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"dropout_seed must be an int in [0, 2**63) (it is stored as int64), "
                         f"got {seed}")


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )


def _check_shape(name: str, t: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} ({meaning}), got {tuple(t.shape)}"
        )


def check_operator_inputs(
    x: Tensor,
    weight,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Optional[Tensor],
    latent: Optional[Tensor],
    dropout_p: float,
    magnitude: Optional[Tensor] = None,
) -> None:
    """The operator's tensors. ``weight``: a dense (N, K) tensor, or a 4-bit weight's
    ``quantized.Packed4bit`` view (``quantized.packed`` validated its quant state)."""
    four_bit = isinstance(weight, Packed4bit)
    named = [("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    if latent is not None:
        named.append(("latent", latent))
    for name, t in named:
        if not (four_bit and name == "weight"):
            _check_float(name, t)

    if four_bit:  # (N, K) from its quant state
        n, k = weight.n, weight.k
    elif weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features N, in_features K), got shape {tuple(weight.shape)}")
    else:
        n, k = weight.shape
    if k < 1:
        raise ValueError(f"in_features K = weight.shape[1] must be at least 1, got weight of shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x must have shape (..., K) with K = weight.shape[1] = {k}, got {tuple(x.shape)}"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, K) with K = {k}, got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"rank r = lora_a.shape[0] must be at least 1, got {r}")
    _check_shape("lora_b", lora_b, (n, r), f"N = {n} from weight, r = {r} from lora_a")
    if latent is not None:
        _check_shape("latent", latent, (r, r), f"r = {r} from lora_a")
    if bias is not None:
        _check_shape("bias", bias, (n,), f"N = {n} from weight")

    # A 4-bit W is dequantized to x's dtype (bnb.matmul_4bit's rule): x's dtype is the compute dtype.
    base_dtype = x.dtype if four_bit else weight.dtype
    if not four_bit and x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype (as in nn.Linear), got x {x.dtype} and weight {weight.dtype}")
    if bias is not None and bias.dtype != base_dtype:
        raise TypeError(f"bias must have {'x' if four_bit else 'weight'}'s dtype {base_dtype}, "
                        f"got {bias.dtype}")
    adapters = [("lora_b", lora_b)] + ([("latent", latent)] if latent is not None else [])
    for name, t in adapters:
        if t.dtype != lora_a.dtype:
            raise TypeError(
                f"adapter tensors must share one dtype: lora_a is {lora_a.dtype}, {name} is {t.dtype}"
            )

    devices = {name: (t.data if four_bit and name == "weight" else t).device
               for name, t in named}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    check_dropout_p(dropout_p)
    if magnitude is not None:
        check_magnitude(magnitude, n, lora_a, x)


def check_magnitude(magnitude, weight_rows: int, lora_a: Tensor, x: Tensor) -> None:
    """DoRA's magnitude: a floating tensor of shape (N,), the adapters' dtype, x's device."""
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor of shape (N,), got {type(magnitude).__name__}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must have a floating-point dtype, got {magnitude.dtype}")
    if tuple(magnitude.shape) != (weight_rows,):
        raise ValueError(f"magnitude must have shape ({weight_rows},) (N from weight), "
                         f"got {tuple(magnitude.shape)}")
    if magnitude.dtype != lora_a.dtype:
        raise TypeError(f"magnitude must have the adapters' dtype {lora_a.dtype} (lora_a's), "
                        f"got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude must be on x's device {x.device}, got {magnitude.device}")
