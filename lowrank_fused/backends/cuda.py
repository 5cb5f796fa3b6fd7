"""CUDA backend: the backend contract (see ``pytorch``) on the compiled extension
lowrank_fused._C (csrc/) for the rank-r passes and cuBLAS (through ATen) for the GEMMs.

Forward: P = dropout(x)·Aᵀ (one read of x); y = s·P·B_effᵀ + bias is written first by a small
cuBLAS GEMM (K = r), then the main GEMM adds x·Wᵀ into it with beta = 1, so y's read happens
in that compute-bound GEMM's epilogue instead of a separate memory-bound pass over y. In half
precision the low-rank term plus bias is rounded once before the GEMM adds it, as the reference
rounds its low-rank term. Backward: one read of G gives dP = s·G·B_eff and the dB_eff and dbias
sums (fp32 atomics; cuBLAS and torch.sum instead under deterministic algorithms); dx is written
as dropout(dP·A) first (kernel, or cuBLAS without dropout), then G·W is added into it (beta = 1);
dA = dPᵀ·dropout(x) with M split across the GPU. Over a 16-bit base every kernel runs on tensor
cores with the low-rank operands (fp32 adapters, P, dP) rounded to the base's dtype as they are
loaded, fp32 accumulation: the Triton backend's numerics, and the GEMMs' here.
"""
from __future__ import annotations

import functools

import torch

from .. import _C  # noqa: F401  (registers torch.ops.lowrank_fused_C)
from .pytorch import latent_gradients, latent_operands
from ._gpu_common import check_dtypes, seed_and_p

NAME = "cuda"
_ops = torch.ops.lowrank_fused_C
_GRAD_A_COLUMNS = 64  # columns of dA per block (csrc: kGradACols)


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _current(device):
    """Context making ``device`` current for the extension's launches."""
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grad_a_splits(m: int, k: int, r: int, multiprocessors: int) -> int:
    """Ways to split M in the dA kernel: enough blocks for two per multiprocessor, with at least
    256 rows per split so the atomic adds stay few."""
    blocks = -(-k // _GRAD_A_COLUMNS) * -(-r // 64)
    wanted = -(-2 * multiprocessors // blocks)
    return max(1, min(wanted, m // 256))


def config_key():
    """Nothing but the call's shapes and dtypes decides which kernel runs."""
    return None


def describe_config(direction, device, shape) -> str:
    return "n/a (fixed launch configurations)"


def dropout_keep_mask(dropout, shape, device):
    with _current(device):
        return _ops.keep_mask(torch.empty(0, device=device), shape[0], shape[1], dropout.seed,
                              dropout.quantised_p, _stream(device))


def forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    check_dtypes("cuda", x, lora_a)
    seed, p_drop = seed_and_p(dropout)
    with _current(x.device):
        p = _ops.project(x, lora_a, 1.0, seed, p_drop, lora_a.dtype, _stream(x.device))
        p_x, b_x = p.to(x.dtype), lora_b_eff.to(x.dtype)
        if bias is None:
            y = x.new_empty((x.shape[0], weight.shape[0]))
            y.addmm_(p_x, b_x.T, beta=0, alpha=scaling)  # beta = 0: y's garbage is not read
        else:
            y = torch.addmm(bias, p_x, b_x.T, alpha=scaling)  # bias added once, here
        y.addmm_(x, weight.T)
    return y, p


def backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None,
             need_x, need_a, need_b, need_latent=False, need_bias):
    grad_y = grad_y.contiguous()  # the kernels index G by rows
    seed, p_drop = seed_and_p(dropout)
    deterministic = torch.are_deterministic_algorithms_enabled()
    n, r = lora_b.shape
    need_latent = need_latent and latent is not None
    p_for_db = latent_operands(p, latent, need_b)
    dx = da = db = dr = dbias = None
    with _current(grad_y.device):
        stream = _stream(grad_y.device)
        need_dp = need_x or need_a
        db32 = dbias32 = None
        if not deterministic:  # dB and dbias ride along the pass over G, as atomic sums
            if need_b:
                db32 = torch.zeros((n, r), dtype=torch.float32, device=grad_y.device)
            if need_bias:
                dbias32 = torch.zeros((n,), dtype=torch.float32, device=grad_y.device)
        dp = None
        if need_dp or need_latent or db32 is not None or dbias32 is not None:
            dp = _ops.grad_output_pass(grad_y, lora_b, p_for_db if db32 is not None else None,
                                       scaling, need_dp or need_latent, db32, dbias32, stream)
        if latent is not None:
            dp, dr = latent_gradients(dp, p, latent, need_dp, need_latent)
        if need_x:
            if dropout is None:
                dx = dp.to(grad_y.dtype) @ lora_a.to(grad_y.dtype)
            else:
                dx = _ops.dropped_low_rank(dp, lora_a, seed, p_drop, grad_y.dtype, stream)
            dx.addmm_(grad_y, weight)
        if need_a:
            m, k = x.shape
            splits = 1 if deterministic else grad_a_splits(
                m, k, r, _multiprocessors(grad_y.device.index or 0))
            da = _ops.grad_a(dp, x, seed, p_drop, splits, stream).to(lora_a.dtype)
        if need_b:
            if db32 is None:
                db32 = scaling * (grad_y.T @ p_for_db.to(grad_y.dtype)).float()
            db = db32.to(lora_b.dtype)
        if need_bias:
            dbias = (dbias32 if dbias32 is not None else grad_y.sum(0)).to(weight.dtype)
    return dx, da, db, dr, dbias
