"""Peak GPU memory of one call, measured apart from what its first call brings."""
from __future__ import annotations

from typing import Callable

import torch


def peak_extra_bytes(step: Callable[[], object], cuda=torch.cuda) -> int:
    """Bytes ``step()`` allocates at its peak beyond what was allocated before it, measured on
    its second call: the first (the warm-up) runs the autotuners' trials, do_bench's L2-flush
    buffer and lazy workspaces, which are not the layer's memory. ``step`` should free what it
    leaves behind (gradients) so both calls start alike. ``cuda``: torch.cuda (a test fakes it)."""
    step()  # warm-up: one full call
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    start = cuda.memory_allocated()
    step()
    cuda.synchronize()
    return cuda.max_memory_allocated() - start
