"""``LowRankLinear``: an nn.Linear with a LoRA, LoRA-FA or LoRA-XS branch, one fused operator."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .ops import effective_lora_b
from .functional import low_rank_linear
from .initialization import kaiming_uniform_a_, lora_xs_factors, lora_xs_latent
from .validation import check_dropout_p, check_rank

METHODS = ("lora", "lora_fa", "lora_xs")
_HALF = (torch.float16, torch.bfloat16)


def scaling_for(rank: int, alpha: Optional[float], use_rslora: bool) -> float:
    """s = alpha / r (alpha / √r with rsLoRA); alpha defaults to r, so s = 1."""
    alpha = float(rank) if alpha is None else float(alpha)
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LowRankLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank branch, usable wherever nn.Linear is.

    y = x·Wᵀ + bias + s · dropout(x)·Aᵀ·R·Bᵀ with W (out, in) frozen and, by method:

    - ``"lora"``: A (r, in) and B (out, r) train; x is saved for backward.
    - ``"lora_fa"``: A frozen (kaiming-uniform), B trains; only x·Aᵀ (M x r) is saved.
    - ``"lora_xs"``: A, B frozen from the truncated SVD of W, only R (r, r) trains.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        rank: r, 1 <= r <= min(in_features, out_features).
        method: "lora", "lora_fa" or "lora_xs".
        alpha: scaling numerator; s = alpha / r (alpha / √r with ``use_rslora``). Default r.
        dropout: dropout probability on the low-rank branch's input.
        adapter_dtype: dtype of A, B, R. Default: float32 over a float16/bfloat16 base (as
            PEFT keeps adapters), else the base's dtype.
        backend: "auto", "reference", "triton" or "cuda" (see ``low_rank_linear``).
        xs_source, xs_triplets, xs_fold_sigma: LoRA-XS init ablations, see
            ``lowrank_fused.initialization.lora_xs_factors``.
        generator: RNG for the adapters' initialisation.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 method: str = "lora", alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto", device=None, dtype=None,
                 xs_source: str = "weight", xs_triplets: str = "top", xs_fold_sigma: bool = True,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._build(base.weight, base.bias, rank, method=method, alpha=alpha, dropout=dropout,
                    use_rslora=use_rslora, adapter_dtype=adapter_dtype, backend=backend,
                    xs_source=xs_source, xs_triplets=xs_triplets, xs_fold_sigma=xs_fold_sigma,
                    generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, method: str = "lora", *,
                    alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                    xs_source: str = "weight", xs_triplets: str = "top",
                    xs_fold_sigma: bool = True,
                    generator: Optional[torch.Generator] = None) -> "LowRankLinear":
        """Wrap an existing ``nn.Linear``: its weight and bias Parameters are reused (not copied)
        and frozen. Other arguments as in the constructor."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(linear.weight, linear.bias, rank, method=method, alpha=alpha,
                     dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype,
                     backend=backend, xs_source=xs_source, xs_triplets=xs_triplets,
                     xs_fold_sigma=xs_fold_sigma, generator=generator)
        return layer

    def _build(self, weight: nn.Parameter, bias: Optional[nn.Parameter], rank: int, *, method,
               alpha, dropout, use_rslora, adapter_dtype, backend, xs_source, xs_triplets,
               xs_fold_sigma, generator) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
        out_features, in_features = weight.shape
        check_rank(rank, out_features, in_features)
        check_dropout_p(dropout)
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in _HALF else weight.dtype

        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.method, self.dropout, self.backend = method, float(dropout), backend
        self.alpha = float(rank) if alpha is None else float(alpha)
        self.use_rslora = use_rslora
        self.scaling = scaling_for(rank, alpha, use_rslora)
        self.merged = False
        self._warned_merged = False

        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

        self._xs_init = dict(source=xs_source, triplets=xs_triplets, fold_sigma=xs_fold_sigma)
        factory = dict(device=weight.device, dtype=adapter_dtype)
        xs = method == "lora_xs"
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **factory),
                                   requires_grad=method == "lora")
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, **factory),
                                   requires_grad=not xs)
        if xs:
            self.latent = nn.Parameter(torch.empty(rank, rank, **factory))
        else:
            self.register_parameter("latent", None)
        if not weight.is_meta:  # on the meta device: call reset_adapters() after to_empty()
            self.reset_adapters(generator)

    @torch.no_grad()
    def reset_adapters(self, generator: Optional[torch.Generator] = None) -> None:
        """(Re)initialise A, B and R from the current W: kaiming-uniform A and B = 0 for LoRA and
        LoRA-FA; the truncated SVD of W and R ~ N(0, 1e-5²) for LoRA-XS."""
        if self.method == "lora_xs":
            a, b = lora_xs_factors(self.weight, self.rank, generator=generator,
                                   dtype=self.lora_a.dtype, **self._xs_init)
            self.lora_a.copy_(a)
            self.lora_b.copy_(b)
            self.latent.copy_(lora_xs_latent(self.rank, generator=generator,
                                             device=self.weight.device))
        else:
            kaiming_uniform_a_(self.lora_a, generator)
            self.lora_b.zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise everything as a fresh layer: W and bias as nn.Linear does, then the
        adapters. Used by meta-device materialisation; a pretrained W wants reset_adapters()."""
        nn.Linear.reset_parameters(self)
        self.reset_adapters()

    def delta_weight(self) -> Tensor:
        """s · B·R·A, shape (out, in), in the adapters' dtype: what merging adds to W."""
        return self.scaling * (effective_lora_b(self.lora_b, self.latent) @ self.lora_a)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self._warned_merged and any(
                p.requires_grad for p in (self.lora_a, self.lora_b, self.latent) if p is not None
            ):
                self._warned_merged = True
                warnings.warn("LowRankLinear is merged: its adapters get no gradient until "
                              "unmerge()", stacklevel=2)
            return nn.functional.linear(x, self.weight, self.bias)
        return low_rank_linear(x, self.weight, self.lora_a, self.lora_b, bias=self.bias,
                               latent=self.latent, scaling=self.scaling,
                               dropout_p=self.dropout, training=self.training,
                               backend=self.backend)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank update into W in place (for inference). W is shared with the
        ``nn.Linear`` this layer was made from, so that one changes too."""
        if self.merged:
            raise RuntimeError("LowRankLinear is already merged")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the low-rank update back out of W (exact in float32/64, rounded in half)."""
        if not self.merged:
            raise RuntimeError("LowRankLinear is not merged")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain ``nn.Linear`` computing this layer's function (update folded in)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        weight = self.weight if self.merged else self.weight + self.delta_weight().to(self.weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def get_extra_state(self) -> dict:
        return {"method": self.method, "rank": self.rank, "scaling": self.scaling,
                "merged": self.merged}

    def set_extra_state(self, state: dict) -> None:
        for key in ("method", "rank"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state_dict is for {key}={state.get(key)!r}, this layer has "
                                 f"{key}={getattr(self, key)!r}")
        self.merged = bool(state.get("merged", False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, method={self.method!r}, scaling={self.scaling:g}, "
                f"dropout={self.dropout:g}, bias={self.bias is not None}, "
                f"merged={self.merged}, backend={self.backend!r}")
