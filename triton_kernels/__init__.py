"""Triton kernels of the low-rank linear operator (installed as lowrank_fused.triton_kernels).

Launchers take 2-D tensors and plain numbers; they know nothing of modules or autograd.
Run on CPU tensors under TRITON_INTERPRET=1 (how CI tests them).

Kernels and their launchers, by direction and operand:
  forward.py     P = dropout(x)·Aᵀ; y = x·Wᵀ + bias + s·P·B_effᵀ (the tiled GEMM)
  backward.py    the pass over G (dP, dB_eff, dbias; DoRA's column scale and Σ G ⊙ Z too), dx, dA
  dora.py        DoRA's forward GEMM and dx (c in the epilogue, G scaled on load)
  quantized.py   the GEMMs over a 4-bit (NF4 / FP4) W, dequantized tile by tile in registers
  persistent.py  the persistent TMA variants of the two main GEMMs (Hopper and later)
  dropout.py     the keep-mask from (seed, row, column), and its kernel for tests
Shared @triton.jit pieces: tiling.py (tile order, addressing, the GEMM loops and epilogue),
low_rank.py (the low-rank term every GEMM starts its accumulator with), mma.py (the one dot and
the one narrowing cast).
Launch configuration: configs.py (the config tables), fit.py (which configs fit a GPU),
autotuner.py (the launcher: fixed config on the interpreter, autotuner on a GPU),
autotune_mode.py (LOWRANK_FUSED_AUTOTUNE), capture.py (no tuning under CUDA graph capture),
precision.py (the dots' dtype and TF32), interpreter.py, variants.py (tiled vs TMA GEMM),
accumulators.py (the kept fp32 accumulators of the atomics).
"""
from .backward import grad_a, grad_input, grad_output_pass
from .dora import dora_grad_input, dora_grad_output_pass, dora_linear
from .dropout import dropout_keep_mask
from .forward import fused_linear, project, project_dropped

__all__ = ["project", "project_dropped", "fused_linear", "grad_output_pass", "grad_input", "grad_a",
           "dropout_keep_mask", "dora_linear", "dora_grad_output_pass", "dora_grad_input"]
