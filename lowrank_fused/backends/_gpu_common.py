"""Argument handling shared by the GPU backends."""
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
