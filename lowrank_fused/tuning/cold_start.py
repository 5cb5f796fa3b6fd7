"""``warmup(model, example_batch)``: compile and tune every key of a model before training.

One forward and one backward on the example batch meet every distinct call of the model's
low-rank layers once, so each key's backend is decided (timed now, or restored from the local
cache or the shipped table) and each kernel compiled and autotuned then, rather than inside the
first training steps. Within a key the candidate configs compile in parallel where Triton
allows (``parallel``); keys are met one after another, as the model runs.

What the model holds is left as it was: the gradients of its parameters (the warmup's own are
dropped), its buffers (values and objects: batch-norm statistics and the like), and the RNG
states (torch's CPU and CUDA generators, Python's ``random``, NumPy's global one if loaded); its
train/eval modes are used as they are. A call that fails restores the same and re-raises.
Parameter values are not copied (a forward and backward do not change them).
"""
from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .choice import Decision, Tuner


def _check(model, example_batch, loss_fn) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"warmup: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_batch, (Tensor, tuple, list, Mapping)):
        raise TypeError("warmup: example_batch must be a tensor (model(batch)), a tuple or list "
                        "(model(*batch)) or a mapping (model(**batch)), got "
                        f"{type(example_batch).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"warmup: loss_fn must be callable or None, got {type(loss_fn).__name__}")


class _ModelState:
    """What a forward and backward may change in a model and the process, kept to restore."""

    def __init__(self, model: nn.Module):
        self.grads = {p: p.grad for p in model.parameters()}
        self.buffers = [(module, name, tensor, None if tensor is None else tensor.detach().clone())
                        for module in model.modules()
                        for name, tensor in module._buffers.items()]
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.python_rng = random.getstate()
        numpy = sys.modules.get("numpy")
        self.numpy_rng = numpy.random.get_state() if numpy is not None else None
        for p in self.grads:
            p.grad = None  # the warmup's gradients land on fresh tensors

    def restore(self) -> None:
        for p, grad in self.grads.items():
            p.grad = grad
        with torch.no_grad():
            for module, name, tensor, copy in self.buffers:
                module._buffers[name] = tensor
                if tensor is not None:
                    tensor.copy_(copy)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)
        if self.numpy_rng is not None:
            sys.modules["numpy"].random.set_state(self.numpy_rng)


def _tensors(value, depth=0):
    """The tensors in a model's output (a tensor, or nested tuples, lists, mappings)."""
    if isinstance(value, Tensor):
        yield value
    elif depth < 4 and isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)


def surrogate_loss(output) -> Optional[Tensor]:
    """A scalar through which every differentiable output gets a gradient: the output's own
    ``loss`` where it has one (Hugging Face outputs), else the sum of each floating output's
    mean (in fp32); None when nothing in it requires grad."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor) and loss.requires_grad:
        return loss
    terms = [t.float().mean() for t in _tensors(output)
             if t.is_floating_point() and t.requires_grad]
    return torch.stack(terms).sum() if terms else None


class _Progress:
    """A tqdm bar when tqdm is importable, else one stderr line per key."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.count = 0
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(desc="lowrank_fused warmup", unit=" keys", file=sys.stderr)

    def __call__(self, decision: Decision) -> None:
        self.count += 1
        if not self.enabled:
            return
        text = f"{decision.key.describe()} -> {decision.winner} ({decision.source})"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"lowrank_fused warmup: key {self.count}: {text}", file=sys.stderr, flush=True)

    def close(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"lowrank_fused warmup: {summary}", file=sys.stderr, flush=True)


def _run(model: nn.Module, example_batch, loss_fn) -> None:
    with torch.enable_grad():
        if isinstance(example_batch, Mapping):
            output = model(**example_batch)
        elif isinstance(example_batch, (tuple, list)):
            output = model(*example_batch)
        else:
            output = model(example_batch)
        loss = loss_fn(output) if loss_fn is not None else surrogate_loss(output)
        if isinstance(loss, Tensor) and loss.requires_grad:
            loss.backward()


def warmup(model: nn.Module, example_batch, *, loss_fn: Optional[Callable] = None,
           progress: bool = True, tuner: Optional[Tuner] = None) -> list:
    """Compile and tune every distinct key of ``model`` once, before training starts.

    Runs ``model`` on ``example_batch`` (``model(batch)``, ``model(*batch)`` for a tuple or
    list, ``model(**batch)`` for a mapping) and a backward from ``loss_fn(output)`` (default:
    ``surrogate_loss``), so each low-rank call's forward and backward backend is decided and
    its kernels compiled. Use a batch of the training shapes (keys bucket M to a power of two).
    The model's gradients, buffers and the RNG states are left as they were, on failure too.
    With DistributedDataParallel, warm up the unwrapped model (its backward would all-reduce).

    Returns the report rows (see ``lowrank_fused.tuning_report``) of the keys decided during
    the call. ``progress``: a tqdm bar (or stderr lines) per key; ``tuner``: for tests.
    """
    _check(model, example_batch, loss_fn)
    from . import tuner as process_tuner
    tuner = tuner or process_tuner()
    decided: list = []
    show = _Progress(progress)

    def listen(decision: Decision) -> None:
        decided.append(decision)
        show(decision)

    remove = tuner.add_listener(listen)
    start = time.perf_counter()
    state = _ModelState(model)
    try:
        _run(model, example_batch, loss_fn)
    finally:
        state.restore()
        remove()
        sources = {}
        for decision in decided:
            sources[decision.source] = sources.get(decision.source, 0) + 1
        counts = ", ".join(f"{n} {source}" for source, n in sources.items()) or "none new"
        show.close(f"{len(decided)} keys ({counts}) in {time.perf_counter() - start:.1f} s")
    return [decision.as_row() for decision in decided]
