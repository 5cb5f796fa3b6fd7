"""``FusedLoraCallback``: serving for transformers' ``Trainer`` (and so TRL's trainers, which
build the PEFT model themselves from ``peft_config``: it exists only as ``trainer.model``).

What it does, and when:

- ``on_init_end`` (the end of ``Trainer.__init__``, before ``train()`` builds the optimizer):
  ``freeze_lora_a(model)`` when asked (LoRA-FA): the optimizer then never holds lora_A, and the
  operator saves P = x·Aᵀ instead of x.
- ``on_train_begin`` (inside ``train()``, after the model is wrapped and a
  ``resume_from_checkpoint`` is loaded): ``enable_fused(model)``. Serving does not change the
  parameters, their names or PEFT's files, so checkpoints stay plain PEFT files.
- ``on_log``: the operator's call counts per backend and the served/fallback layer counts
  (``stats(model).as_logs()``) join the logs (and the step's entry in ``state.log_history``).
  Callbacks run in order and the reporting integrations (W&B, TensorBoard) come first in a
  Trainer's list: they see these keys only if this callback is placed before them.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from transformers import TrainerCallback

from .call_counts import stats
from .enable import enable_fused
from .lora_fa import freeze_lora_a

logger = logging.getLogger("lowrank_fused.peft")


class FusedLoraCallback(TrainerCallback):
    """Serve a Trainer's PEFT model with the fused operator.

    Args:
        freeze_lora_a: LoRA-FA: freeze lora_A of ``adapters`` when the Trainer is built.
        adapters: the adapters to freeze (default: every adapter present then).
        backend: ``enable_fused``'s backend ("auto", "reference", "triton", "cuda").
        strict: ``enable_fused``'s strict: a layer that would not be served stops ``train()``
            before the first step, listing every such layer.
        log_stats: add the operator's call counts to the Trainer's logs.

    ``result`` holds ``enable_fused``'s result once training began.
    """

    def __init__(self, freeze_lora_a: bool = False, adapters: Optional[Sequence[str]] = None,
                 backend: str = "auto", strict: bool = False, log_stats: bool = True):
        self.freeze_lora_a = freeze_lora_a
        self.adapters = adapters
        self.backend = backend
        self.strict = strict
        self.log_stats = log_stats
        self.result = None
        self._frozen = False

    def _freeze(self, model) -> None:
        if self.freeze_lora_a and model is not None:
            freeze_lora_a(model, self.adapters)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._freeze(model)
        self._frozen = model is not None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.freeze_lora_a and not self._frozen:
            # added after the Trainer was built: lora_A is frozen now, after the optimizer was
            # made; it gets no gradient, so the optimizer leaves it as it is
            logger.warning("lowrank_fused: FusedLoraCallback(freeze_lora_a=True) was added after "
                           "the Trainer was built: pass it in Trainer(callbacks=[...]) so that "
                           "lora_A is frozen before the optimizer is made")
        self._freeze(model)  # again: loading a checkpoint may have re-marked lora_A trainable
        self.result = enable_fused(model, backend=self.backend, strict=self.strict)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_stats or logs is None or model is None or self.result is None:
            return
        counts = stats(model).as_logs()
        logs.update(counts)
        entry = state.log_history[-1] if state.log_history else None
        if isinstance(entry, dict) and entry.get("step") == state.global_step and \
                all(entry.get(k) == v for k, v in logs.items() if k not in counts):
            entry.update(counts)  # the Trainer appended a copy of logs before this call
