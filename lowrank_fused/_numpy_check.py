"""Triton's CPU interpreter needs numpy < 2.4: fail with that, not an opaque InterpreterError."""
from __future__ import annotations

import re

from .errors import BackendUnavailableError

# Triton 3.6's interpreter turns 1-element arrays into Python ints, which numpy 2.4 refuses.
FIRST_BROKEN_NUMPY = (2, 4)


def _major_minor(version: str) -> tuple:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_numpy_for_triton_interpreter() -> None:
    """Raise BackendUnavailableError if the installed numpy breaks Triton's interpreter."""
    import numpy  # imported here: only the interpreter path needs it

    if _major_minor(numpy.__version__) >= FIRST_BROKEN_NUMPY:
        raise BackendUnavailableError(
            f"backend 'triton' on the CPU interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, "
            f"got numpy {numpy.__version__}: every kernel launch would fail inside triton. "
            "Install a working one with pip install 'numpy<2.4' (the [test] extra pins it), "
            "run on a GPU without TRITON_INTERPRET, or use backend='reference'"
        )
