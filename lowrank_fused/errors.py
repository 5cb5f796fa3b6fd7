"""Exceptions raised by lowrank_fused."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not usable here; the message says how to get it."""


class DoubleBackwardError(RuntimeError):
    """create_graph=True through the operator: its backward is not differentiable, so
    second-order gradients are refused rather than returned wrong."""


class InplaceOutputError(RuntimeError):
    """A DoRA call's output was changed in place before backward while its magnitude's gradient
    needed it and x, from which it could be recomputed, was not kept (lora_a frozen)."""
