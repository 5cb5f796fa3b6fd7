"""HuggingFace PEFT glue, one module per job:

- ``enable``: ``enable_fused(model)`` runs PEFT's LoRA Linear layers through the fused operator
  (``serving``: the served layers' forward; ``reasons``: why a layer or a call is not served).
- ``call_counts``: ``stats(model)``, the operator's calls per backend and per served layer.
- ``callback``: ``FusedLoraCallback`` for transformers' ``Trainer`` (and TRL's trainers).
- ``lora_fa``: ``freeze_lora_a(model)``, LoRA-FA that PEFT's adapter operations cannot undo.
- ``lora_xs``: ``convert_to_lora_xs(model)``, LoRA-XS inside a PEFT model; ``latents(model)``.
- ``files``: ``save_lora_xs`` / ``load_lora_xs``, PEFT's files (plain PEFT reads them) plus ours.
- ``qlora``: ``FusedLoraLinear4bit``, PEFT's 4-bit (bitsandbytes) LoRA layer served (needs
  bitsandbytes; ``lowrank_fused.peft.FusedLoraLinear4bit`` imports it on first use).
"""
from .call_counts import FusedStats, reset_stats, stats
from .enable import FusedPeft, disable_fused, enable_fused
from .files import LATENT_CONFIG, LATENT_FILE, load_lora_xs, save_lora_xs
from .lora_fa import freeze_lora_a
from .lora_xs import convert_to_lora_xs, latents
from .serving import FusedLoraLinear

__all__ = ["enable_fused", "disable_fused", "FusedPeft", "FusedLoraLinear", "stats",
           "reset_stats", "FusedStats", "FusedLoraCallback", "freeze_lora_a",
           "convert_to_lora_xs", "latents", "save_lora_xs", "load_lora_xs", "LATENT_FILE",
           "LATENT_CONFIG"]


def __getattr__(name):
    # imported on first use, never at import: PEFT's 4-bit layer exists only with bitsandbytes,
    # the callback needs transformers' Trainer
    if name == "FusedLoraLinear4bit":
        from .qlora import FusedLoraLinear4bit
        return FusedLoraLinear4bit
    if name == "FusedLoraCallback":
        from .callback import FusedLoraCallback
        return FusedLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
