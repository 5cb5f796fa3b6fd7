"""The package's environment variables, read on every call without ``os.environ.get``'s cost.

``os.environ.get`` encodes the name and decodes the value in Python on every read (about a
microsecond, a tenth of a small call's budget); a reader made by ``reader(name)`` encodes the name
once and looks it up in the mapping's own dict, so a change made through ``os.environ`` (or
pytest's ``monkeypatch.setenv``) is seen at the next call as before.
"""
from __future__ import annotations

import os
from typing import Callable, Optional


def reader(name: str) -> Callable[[], Optional[str]]:
    """A function returning the current value of the environment variable ``name`` (None when
    unset)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    decode = getattr(environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:  # not CPython's mapping
        return lambda: os.environ.get(name)
    key = encode(name)

    def read() -> Optional[str]:
        if os.environ is not environ:  # replaced wholesale (a test's patch): the slow path
            return os.environ.get(name)
        raw = data.get(key)
        return None if raw is None else decode(raw)

    return read
