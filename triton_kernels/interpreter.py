"""Whether the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1): how CI runs them."""
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
