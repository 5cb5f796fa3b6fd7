"""lowrank_fused: fused LoRA, LoRA-FA and LoRA-XS linear layers.

One operator, y = x·Wᵀ + bias + s·(x·Aᵀ)·R·Bᵀ over a frozen W, whose backward keeps only the
activations the trainable tensors need.
"""
from . import _source_checkout

_source_checkout.install()  # before anything imports the kernels

from .dispatch import available_backends  # noqa: E402
from .errors import BackendUnavailableError, DoubleBackwardError, InplaceOutputError  # noqa: E402
from .functional import low_rank_linear  # noqa: E402
from .initialization import (  # noqa: E402
    kaiming_uniform_a_, lora_xs_factors, lora_xs_latent, truncated_svd)
from .layer import METHODS, LowRankLinear, scaling_for  # noqa: E402
from .surgery import LowRankSummary, apply_low_rank, count_parameters  # noqa: E402
from .tuning import tuning_report, warmup  # noqa: E402

__all__ = [
    "low_rank_linear", "LowRankLinear", "apply_low_rank", "LowRankSummary", "count_parameters",
    "available_backends", "BackendUnavailableError", "DoubleBackwardError", "InplaceOutputError",
    "METHODS", "scaling_for",
    "kaiming_uniform_a_", "lora_xs_factors", "lora_xs_latent", "truncated_svd",
    "tuning_report", "warmup",
]
__version__ = "0.1.0"
