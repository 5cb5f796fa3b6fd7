"""Argument handling shared by the GPU backends."""
import contextlib

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtypes(backend: str, x, lora_a) -> None:
    for name, t in (("x", x), ("adapters", lora_a)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend '{backend}' supports float16, bfloat16 and float32; {name} "
                            f"is {t.dtype} (use backend='reference')")


def seed_and_p(dropout):
    """(seed, quantised p) of a DropoutSpec, (0, 0.0) without dropout."""
    return (0, 0.0) if dropout is None else (dropout.seed, dropout.quantised_p)


def device_guard(device):
    """Context making ``device`` current: Triton launches (and allocates its scratch) on the
    current CUDA device and stream, not on the tensors'. A null context off CUDA (the
    interpreter's CPU tensors, meta tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
