"""Exceptions raised by lowrank_fused."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not usable here; the message says how to get it."""
