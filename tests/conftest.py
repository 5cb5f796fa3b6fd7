import os

import torch

# Without a GPU the Triton kernels run on the interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
