"""Initialisation of the low-rank factors: PEFT's kaiming-uniform A for LoRA and LoRA-FA, the
truncated SVD of W for LoRA-XS (README, "API": Initialisation)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SVD_SOURCES = ("weight", "random_svd", "random")
SVD_TRIPLETS = ("top", "bottom")
# When min(N, K) exceeds this on the CPU, the top-r SVD is randomized (torch.svd_lowrank): exact
# SVD of a 4096 x 11008 weight takes minutes on a laptop CPU, the randomized one seconds. On a GPU
# the exact SVD takes about a second at that size, so there it is always exact.
EXACT_SVD_MAX_DIM = 1024
# Randomized SVD settings at least as accurate as the LoRA-XS paper's (sklearn's randomized_svd,
# n_iter=10, 10 oversamples): as many power iterations, more oversampling. With niter=4 an
# 1100 x 1100 Gaussian matrix at r = 32 kept 0.94 of the optimal energy; with these, 0.996.
RANDOMIZED_SVD_NITER = 10


def _randomized_svd_width(rank: int, matrix: Tensor) -> int:
    """Sketch width q: r plus max(10, r) oversamples, at most min(N, K)."""
    return min(rank + max(10, rank), min(matrix.shape))


def kaiming_uniform_a_(lora_a: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """PEFT's default for A: kaiming-uniform with a = √5 (bound 1/√K). In place."""
    bound = 1.0 / math.sqrt(lora_a.shape[1])
    with torch.no_grad():
        return lora_a.uniform_(-bound, bound, generator=generator)


def lora_xs_latent(rank: int, *, std: float = 1e-5, dtype=None, device=None,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """R ~ N(0, std²), shape (r, r); the LoRA-XS paper uses std = 1e-5."""
    return torch.randn(rank, rank, dtype=dtype, device=device, generator=generator) * std


def truncated_svd(matrix: Tensor, rank: int, *, triplets: str = "top",
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r (N x r), S_r (r,), Vh_r (r x K)) of the r largest ("top") or smallest ("bottom")
    singular triplets, in float32 or float64. Exact on a GPU and for small matrices; on the CPU,
    randomized (torch.svd_lowrank, 10 power iterations, oversampled) for large ones when only the
    top triplets are wanted, at least as accurate as the LoRA-XS paper's sklearn call."""
    if triplets not in SVD_TRIPLETS:
        raise ValueError(f"triplets must be one of {SVD_TRIPLETS}, got {triplets!r}")
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    exact = min(work.shape) <= EXACT_SVD_MAX_DIM or work.device.type == "cuda"
    if triplets == "top" and not exact:
        q = _randomized_svd_width(rank, work)
        if generator is not None:
            # svd_lowrank draws its sketch from the global RNG; fork it so `generator` governs it.
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
            devices = [work.device] if work.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(work, q=q, niter=RANDOMIZED_SVD_NITER)
        else:
            u, s, v = torch.svd_lowrank(work, q=q, niter=RANDOMIZED_SVD_NITER)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    if triplets == "top":
        return u[:, :rank], s[:rank], vh[:rank]
    return u[:, -rank:], s[-rank:], vh[-rank:]


def lora_xs_factors(weight: Tensor, rank: int, *, source: str = "weight", triplets: str = "top",
                    fold_sigma: bool = True, generator: Optional[torch.Generator] = None,
                    dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The frozen LoRA-XS factors (A (r x K), B (N x r)) for a weight W (N x K).

    source="weight": truncated SVD of W, A = diag(S_r)·Vh_r, B = U_r (the paper's method).
    source="random_svd": the same from the SVD of a Gaussian matrix shaped like W (ablation).
    source="random": kaiming-uniform A and B, no SVD (ablation).
    fold_sigma=False drops diag(S_r) from A; triplets="bottom" takes the smallest singular
    triplets. Returned on W's device in ``dtype`` (default W's dtype).
    """
    dtype = weight.dtype if dtype is None else dtype
    if source not in SVD_SOURCES:
        raise ValueError(f"source must be one of {SVD_SOURCES}, got {source!r}")
    n, k = weight.shape
    if source == "random":
        a = kaiming_uniform_a_(torch.empty(rank, k, device=weight.device), generator)
        b = kaiming_uniform_a_(torch.empty(n, rank, device=weight.device), generator)
        return a.to(dtype), b.to(dtype)
    matrix = weight
    if source == "random_svd":
        matrix = torch.randn(n, k, device=weight.device, generator=generator)
    u, s, vh = truncated_svd(matrix, rank, triplets=triplets, generator=generator)
    a = s[:, None] * vh if fold_sigma else vh
    return a.to(dtype).contiguous(), u.to(dtype).contiguous()
