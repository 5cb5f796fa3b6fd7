"""What one backend choice is made for: ``TuningKey``.

A key names a call's kind, not its data: the pass (forward or backward apart), the base and
adapter dtypes, the method (which adapters train), the flags that change the kernels, M rounded
up to a power of two (token counts vary from step to step; the kernels' autotuners bucket M the
same way), and N, K, r. The GPU and the versions are not in the key: the cache file they live
in is per machine (``environment``).
"""
from __future__ import annotations

import dataclasses
import re

import torch

OPS = ("forward", "backward")
METHODS = ("lora", "lora_fa", "lora_xs")
# Everything that changes which kernels run or how much work they do; a closed vocabulary, so
# a cache entry naming anything else is malformed.
FLAGS = ("bias", "dropout", "dora", "4bit", "needs_dx", "deterministic")
DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_DIM = 2**40  # far above any real M, N, K or r; bounds what a cache file may claim
_SEPARATOR = "|"


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at least 1)."""
    return 1 << max(int(m) - 1, 0).bit_length()


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 (or the string itself)."""
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class TuningKey:
    """One backend choice: see the module's docstring. Build it with ``TuningKey.of``."""
    op: str
    dtype: str
    adapter_dtype: str
    method: str
    flags: tuple
    m: int
    n: int
    k: int
    r: int

    def __post_init__(self):
        problems = []
        if self.op not in OPS:
            problems.append(f"op {self.op!r} (expected one of {OPS})")
        for field in ("dtype", "adapter_dtype"):
            if getattr(self, field) not in DTYPES:
                problems.append(f"{field} {getattr(self, field)!r} (expected one of {DTYPES})")
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} (expected one of {METHODS})")
        if (not isinstance(self.flags, tuple) or any(f not in FLAGS for f in self.flags)
                or list(self.flags) != sorted(set(self.flags))):
            problems.append(f"flags {self.flags!r} (expected a sorted tuple of distinct flags "
                            f"from {FLAGS})")
        for field in ("m", "n", "k", "r"):
            value = getattr(self, field)
            if type(value) is not int or not 1 <= value <= MAX_DIM:
                problems.append(f"{field} {value!r} (expected an int in [1, 2**40])")
        if type(self.m) is int and self.m >= 1 and self.m != m_bucket(self.m):
            problems.append(f"m {self.m} (expected a power of two: M is bucketed)")
        if problems:
            raise ValueError("invalid tuning key: " + "; ".join(problems))

    @classmethod
    def of(cls, op: str, dtype, adapter_dtype, method: str, m: int, n: int, k: int, r: int,
           flags=()) -> "TuningKey":
        """The key of a call with M = ``m`` rows (bucketed here); dtypes as torch dtypes or
        names; ``flags`` any iterable of FLAGS."""
        return cls(op, dtype_name(dtype), dtype_name(adapter_dtype), method,
                   tuple(sorted(set(flags))), m_bucket(m), int(n), int(k), int(r))

    @property
    def id(self) -> str:
        """The key as one line, e.g. "forward|bfloat16|float32|lora_fa|bias+dropout|8192|4096|4096|16";
        the name of its entry in the cache and the shipped table."""
        return _SEPARATOR.join([self.op, self.dtype, self.adapter_dtype, self.method,
                                "+".join(self.flags), str(self.m), str(self.n), str(self.k),
                                str(self.r)])

    @classmethod
    def parse(cls, text: str) -> "TuningKey":
        """The key whose ``id`` is ``text``; ValueError for anything else."""
        if not isinstance(text, str):
            raise ValueError(f"a tuning key id must be a string, got {type(text).__name__}")
        parts = text.split(_SEPARATOR)
        if len(parts) != 9:
            raise ValueError(f"a tuning key id has 9 fields separated by '|', got {text!r}")
        op, dtype, adapter_dtype, method, flags, *dims = parts
        if not all(re.fullmatch(r"[1-9][0-9]{0,12}", d) for d in dims):
            raise ValueError(f"tuning key {text!r}: M, N, K, r must be positive integers")
        key = cls(op, dtype, adapter_dtype, method, tuple(flags.split("+")) if flags else (),
                  *map(int, dims))
        if key.id != text:  # one spelling per key (no reordered flags, no leading zeros)
            raise ValueError(f"tuning key {text!r} is not in canonical form ({key.id!r})")
        return key

    def describe(self) -> str:
        """A short human reading, for progress lines and the report."""
        flags = f" [{', '.join(self.flags)}]" if self.flags else ""
        dtypes = self.dtype if self.dtype == self.adapter_dtype else f"{self.dtype}/{self.adapter_dtype}"
        return (f"{self.op} {self.method} {dtypes}{flags} M<={self.m} N={self.n} K={self.k} "
                f"r={self.r}")


def method_of(trains_a: bool, trains_b: bool, trains_latent: bool) -> str:
    """The method by which adapters train, from the gradients a backward computes (dA: "lora";
    dB without dA: "lora_fa"; dR alone: "lora_xs"); "lora" when none is asked for."""
    if trains_a:
        return "lora"
    if trains_b:
        return "lora_fa"
    return "lora_xs" if trains_latent else "lora"


def deterministic_flag() -> tuple:
    """("deterministic",) when torch's deterministic algorithms are on (other reductions run)."""
    return ("deterministic",) if torch.are_deterministic_algorithms_enabled() else ()
