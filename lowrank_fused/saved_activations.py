"""Count what autograd keeps for backward: the measure of this package's memory saving.

One helper for the tests, the benchmarks and the examples (it lives in the package because the
example scripts run outside the repository, where ``benchmarks/`` and ``tests/`` are not
importable)::

    with SavedActivations(model) as saved:
        loss = model(x).sum()
    loss.backward()
    saved.nbytes, saved.shapes()

Every tensor an autograd node saves passes through ``torch.autograd.graph.saved_tensors_hooks``;
those that share storage with a parameter of the given modules are not activations and are left
out.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SavedActivations:
    """Context manager recording the tensors autograd saves while it is open.

    ``tensors``: every saved tensor except the parameters of ``modules``, in the order saved
    (a tensor saved by two nodes appears twice). ``nbytes``: the memory they hold, each distinct
    storage counted once at its full size (what stays allocated until backward).
    """

    def __init__(self, *modules: nn.Module):
        self._parameters = [p for m in modules for p in m.parameters()]
        self.tensors: list[Tensor] = []
        self._hooks = None

    def _pack(self, tensor: Tensor) -> Tensor:
        # the parameters' storages as they are now: a parameter may get a new one mid-forward
        # (bitsandbytes repacks a CPU 4-bit weight between eval and training), and an
        # activation may then be allocated where the old one was
        ptr = tensor.untyped_storage().data_ptr()
        if all(p.untyped_storage().data_ptr() != ptr for p in self._parameters):
            self.tensors.append(tensor)
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self.tensors}
        return sum(storages.values())

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.tensors]
