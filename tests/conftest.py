import atexit
import os
import shutil
import tempfile

import torch

# Without a GPU the Triton kernels run on the interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "auto" on CUDA tensors times its backends and records them in the tuning cache: the tests'
# decisions go to a directory of their own, never into the user's cache.
if not os.environ.get("LOWRANK_FUSED_CACHE_DIR"):
    _tuning_cache = tempfile.mkdtemp(prefix="lowrank_fused-tests-")
    os.environ["LOWRANK_FUSED_CACHE_DIR"] = _tuning_cache
    atexit.register(shutil.rmtree, _tuning_cache, ignore_errors=True)
