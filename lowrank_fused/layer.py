"""``LowRankLinear``: an nn.Linear with a LoRA, LoRA-FA or LoRA-XS branch, one fused operator."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import dora as dora_norm
from . import quantized
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
        dora: DoRA (with "lora" or "lora_fa"): a trainable magnitude m (out,), initialised as
            PEFT does to ‖W + s·B·A‖ per row, and y = c ⊙ (x·Wᵀ + s·P·Bᵀ) + bias with
            c = m / ‖W + s·B·A‖ (``low_rank_linear(..., magnitude=)``); over a 4-bit base too
            (QDoRA; merge() refuses there, as for every 4-bit layer).

    Attributes:
        name: the label of this layer's calls in ``lowrank_fused.stats`` (``apply_low_rank``
            sets it to the module's qualified name); None counts them as unnamed.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 method: str = "lora", alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto", device=None, dtype=None,
                 xs_source: str = "weight", xs_triplets: str = "top", xs_fold_sigma: bool = True,
                 generator: Optional[torch.Generator] = None, dora: bool = False) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._build(base.weight, base.bias, rank, method=method, alpha=alpha, dropout=dropout,
                    use_rslora=use_rslora, adapter_dtype=adapter_dtype, backend=backend,
                    xs_source=xs_source, xs_triplets=xs_triplets, xs_fold_sigma=xs_fold_sigma,
                    generator=generator, dora=dora)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, method: str = "lora", *,
                    alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                    xs_source: str = "weight", xs_triplets: str = "top",
                    xs_fold_sigma: bool = True,
                    generator: Optional[torch.Generator] = None,
                    dora: bool = False) -> "LowRankLinear":
        """Wrap an existing ``nn.Linear``: its weight and bias Parameters are reused (not copied)
        and frozen. Other arguments as in the constructor.

        A bitsandbytes ``Linear4bit`` (QLoRA) is wrapped the same way: its ``Params4bit`` stays
        4-bit (dequantized per call, never saved dense), x is cast to its compute dtype as
        bitsandbytes does and y back to x's dtype; LoRA-XS's SVD dequantizes W once. Such a
        layer does not merge (``merge``/``to_linear`` raise: W would need re-quantizing)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.compute_dtype = None
        if quantized.is_linear4bit(linear):
            quantized.check_4bit(linear.weight, "linear.weight")
            layer.compute_dtype = quantized.compute_dtype_of(linear)
        layer._build(linear.weight, linear.bias, rank, method=method, alpha=alpha,
                     dropout=dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype,
                     backend=backend, xs_source=xs_source, xs_triplets=xs_triplets,
                     xs_fold_sigma=xs_fold_sigma, generator=generator, dora=dora)
        return layer

    def _build(self, weight: nn.Parameter, bias: Optional[nn.Parameter], rank: int, *, method,
               alpha, dropout, use_rslora, adapter_dtype, backend, xs_source, xs_triplets,
               xs_fold_sigma, generator, dora=False) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
        if not isinstance(dora, bool):
            raise TypeError(f"dora must be a bool, got {type(dora).__name__}")
        if dora and method == "lora_xs":
            raise ValueError("dora=True works with method='lora' or 'lora_fa' (DoRA-FA); "
                             "LoRA-XS with a DoRA magnitude is not supported")
        out_features, in_features = quantized.shape(weight)
        check_rank(rank, out_features, in_features)
        check_dropout_p(dropout, "dropout")
        self.__dict__.setdefault("compute_dtype", None)  # a 4-bit base's, set by from_linear
        base_dtype = self.compute_dtype or weight.dtype
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if base_dtype in _HALF else base_dtype

        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.method, self.dropout, self.backend = method, float(dropout), backend
        self.alpha = float(rank) if alpha is None else float(alpha)
        self.use_rslora = use_rslora
        self.scaling = scaling_for(rank, alpha, use_rslora)
        self.merged = False
        self.dora = dora
        self.name: Optional[str] = None
        self._warned_merged = False
        # While merged: W as it was before merge(), so unmerge() restores it bit-for-bit. A
        # non-persistent buffer: it follows .to() but never enters the state_dict.
        self.register_buffer("_weight_before_merge", None, persistent=False)
        # DoRA while merged: the row norm ‖W + s·B·A‖ of the unmerged W (unmerge's c).
        self.register_buffer("_dora_norm_at_merge", None, persistent=False)

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
        if dora:
            self.magnitude = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("magnitude", None)
        if not weight.is_meta:  # on the meta device: call reset_adapters() after to_empty()
            self.reset_adapters(generator)

    @torch.no_grad()
    def reset_adapters(self, generator: Optional[torch.Generator] = None) -> None:
        """(Re)initialise A, B and R from the current W: kaiming-uniform A and B = 0 for LoRA and
        LoRA-FA; the truncated SVD of W and R ~ N(0, 1e-5²) for LoRA-XS. A merged layer refuses
        (its W holds the old update): unmerge() first."""
        self._refuse_if_merged("reset_adapters")
        if self.method == "lora_xs":
            weight = self.weight
            if quantized.is_4bit(weight):  # its SVD runs on W dequantized once
                weight = quantized.dequantize(weight, weight.quant_state.dtype)
            a, b = lora_xs_factors(weight, self.rank, generator=generator,
                                   dtype=self.lora_a.dtype, **self._xs_init)
            self.lora_a.copy_(a)
            self.lora_b.copy_(b)
            self.latent.copy_(lora_xs_latent(self.rank, generator=generator,
                                             device=self.weight.device))
        else:
            kaiming_uniform_a_(self.lora_a, generator)
            self.lora_b.zero_()
        if self.dora:  # PEFT's init: m = ‖W + s·B·A‖ per row
            self.magnitude.copy_(self._dora_norm())

    def _dora_norm(self) -> Tensor:
        """‖W + s·B·A‖ per row, fp32 (fp64 for fp64), factored (``lowrank_fused.dora``)."""
        return dora_norm.row_norm(self.weight, self.lora_a,
                                  effective_lora_b(self.lora_b, self.latent), self.scaling)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise everything as a fresh layer: W and bias as nn.Linear does, then the
        adapters. Used by meta-device materialisation; a pretrained W wants reset_adapters().
        A merged layer refuses: unmerge() first."""
        self._refuse_if_merged("reset_parameters")
        nn.Linear.reset_parameters(self)
        self.reset_adapters()

    def _refuse_if_merged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"LowRankLinear is merged: call unmerge() before {what}(), else W "
                               "keeps the update of adapters that no longer exist")

    def delta_weight(self) -> Tensor:
        """s · B·R·A, shape (out, in), in the adapters' dtype: what merging adds to W. With DoRA,
        c ⊙ (W + s·B·A) − W (c = m / ‖W + s·B·A‖ per row, of the unmerged W)."""
        delta = self.scaling * (effective_lora_b(self.lora_b, self.latent) @ self.lora_a)
        if not self.dora:
            return delta
        if self.merged:  # W holds c·(W + s·B·A): the unmerged W (and so c) is not at hand
            raise RuntimeError("delta_weight() of a merged DoRA layer: unmerge() first (its W "
                               "already holds c·(W + s·B·A))")
        with torch.no_grad():
            c = (self.magnitude.detach().to(torch.float32 if self.weight.dtype != torch.float64
                                            else torch.float64) / self._dora_norm())
        w = quantized.dense_like(self.weight, c.dtype).to(c.dtype)  # 4-bit: dequantized
        return (c.unsqueeze(1) * (w + delta.to(c.dtype)) - w).to(delta.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self._warned_merged and any(
                p.requires_grad for p in (self.lora_a, self.lora_b, self.latent) if p is not None
            ):
                self._warned_merged = True
                warnings.warn("LowRankLinear is merged: its adapters get no gradient until "
                              "unmerge()", stacklevel=2)
            return nn.functional.linear(x, self.weight, self.bias)
        if self.compute_dtype is not None:  # a 4-bit base: bitsandbytes' dtype rule
            x_c = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
            bias = self.bias
            if bias is not None and bias.dtype != self.compute_dtype:
                bias = bias.to(self.compute_dtype)
            y = low_rank_linear(x_c, self.weight, self.lora_a, self.lora_b, bias=bias,
                                latent=self.latent, scaling=self.scaling,
                                dropout_p=self.dropout, training=self.training,
                                backend=self.backend, magnitude=self.magnitude, name=self.name)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return low_rank_linear(x, self.weight, self.lora_a, self.lora_b, bias=self.bias,
                               latent=self.latent, scaling=self.scaling,
                               dropout_p=self.dropout, training=self.training,
                               backend=self.backend, magnitude=self.magnitude, name=self.name)

    def _refuse_if_4bit(self, what: str) -> None:
        if quantized.is_4bit(self.weight):
            raise RuntimeError(f"LowRankLinear over a 4-bit (bitsandbytes) weight cannot "
                               f"{what}: W would need re-quantizing; keep the adapters separate "
                               "(PEFT's merge_and_unload on a 4-bit model re-quantizes)")

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the low-rank update into W in place (for inference). W is shared with the
        ``nn.Linear`` this layer was made from, so that one changes too.

        With ``keep_original`` (default) the layer keeps a copy of the pre-merge W until
        ``unmerge()`` (one more W in memory, on W's device), so that unmerge restores W
        bit-for-bit in every dtype: subtracting the update again would round. Pass False to
        save that memory when you will not unmerge, or use ``to_linear()``."""
        self._refuse_if_4bit("merge")
        if self.merged:
            raise RuntimeError("LowRankLinear is already merged")
        if keep_original:
            self._weight_before_merge = self.weight.detach().clone()
        if self.dora:
            self._dora_norm_at_merge = self._dora_norm()
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the low-rank update back out of W: bit-for-bit the W from before ``merge()``.
        Without that copy (``merge(keep_original=False)``, or a layer loaded merged from a
        state_dict) the update is subtracted instead, which rounds."""
        if not self.merged:
            raise RuntimeError("LowRankLinear is not merged")
        if self._weight_before_merge is not None:
            self.weight.copy_(self._weight_before_merge)
        elif self.dora:
            norm = self._dora_norm_at_merge
            if norm is None:
                raise RuntimeError("this DoRA layer was loaded merged: its unmerged row norms "
                                   "are unknown, so W cannot be taken back out; load the "
                                   "unmerged state_dict instead")
            c = (self.magnitude.to(norm.dtype) / norm).unsqueeze(1)
            delta = self.scaling * (effective_lora_b(self.lora_b, self.latent) @ self.lora_a)
            self.weight.copy_((self.weight.to(c.dtype) / c - delta.to(c.dtype)))
        else:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self._weight_before_merge = None
        self._dora_norm_at_merge = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain ``nn.Linear`` computing this layer's function (update folded in)."""
        self._refuse_if_4bit("convert to_linear")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        weight = self.weight if self.merged else self.weight + self.delta_weight().to(self.weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def get_extra_state(self) -> dict:
        state = {"method": self.method, "rank": self.rank, "scaling": self.scaling,
                 "merged": self.merged}
        if self.dora:
            state["dora"] = True
        return state

    def _extra_state_problem(self, state) -> Optional[str]:
        """Why a saved extra state cannot be loaded into this layer, or None."""
        if not isinstance(state, dict):
            return f"LowRankLinear extra state must be a dict, got {type(state).__name__}"
        for key in ("method", "rank"):
            if state.get(key) != getattr(self, key):
                return (f"state_dict is for {key}={state.get(key)!r}, this layer has "
                        f"{key}={getattr(self, key)!r}")
        if bool(state.get("dora", False)) != self.dora:
            return (f"state_dict is for dora={bool(state.get('dora', False))!r}, this layer has "
                    f"dora={self.dora!r}")
        merged = state.get("merged", False)
        if not isinstance(merged, bool):
            return f"state_dict's 'merged' must be a bool, got {type(merged).__name__} {merged!r}"
        saved_scaling = state.get("scaling", self.scaling)
        if merged and saved_scaling != self.scaling:
            # the saved W holds s·ΔW at the saved s; unmerge() here would subtract another s
            return (f"state_dict is merged with scaling={saved_scaling!r}, this layer has "
                    f"scaling={self.scaling!r}")
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Check the extra state before any of this layer's tensors is copied; on a mismatch copy
        # nothing, and let PyTorch report size mismatches beside ours (it raises at the end).
        key = prefix + "_extra_state"
        problem = self._extra_state_problem(state_dict[key]) if key in state_dict else None
        if problem is None:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            return
        error_msgs.append(problem + " (nothing of this layer was loaded)")
        own = {**dict(self.named_parameters(recurse=False)),
               **{n: b for n, b in self.named_buffers(recurse=False) if b is not None}}
        mismatched = {}
        for name, tensor in own.items():
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != tensor.shape:
                mismatched[prefix + name] = saved
        # only mismatched shapes: PyTorch reports each and copies none; its other findings
        # (keys absent from this filtered dict) go to throwaway lists
        super()._load_from_state_dict(mismatched, prefix, local_metadata, strict, [], [],
                                      error_msgs)

    def set_extra_state(self, state: dict) -> None:
        problem = self._extra_state_problem(state)
        if problem is not None:
            raise ValueError(problem)
        self.merged = state.get("merged", False)
        self._weight_before_merge = None  # W was just loaded: any pre-merge copy is stale
        self._dora_norm_at_merge = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, method={self.method!r}, scaling={self.scaling:g}, "
                f"dropout={self.dropout:g}, bias={self.bias is not None}, "
                f"merged={self.merged}, backend={self.backend!r}"
                + (", dora=True" if self.dora else ""))
