"""``LOWRANK_FUSED_AUTOTUNE``: how a launch config (and the main GEMMs' variant) is chosen on a
GPU: "full" times the candidates once per key, "quick" takes the first by rule, untimed."""
import os

AUTOTUNE_ENV = "LOWRANK_FUSED_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """``LOWRANK_FUSED_AUTOTUNE``: "full" (default; unset or empty) times every fitting config
    once per key; "quick" takes the first fitting config by rule, with no timing (correctness
    runs on a GPU, where tuning would only cost time)."""
    mode = os.environ.get(AUTOTUNE_ENV) or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}: expected one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode
