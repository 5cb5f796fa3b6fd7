"""Triton kernels of the low-rank linear operator (installed as lowrank_fused.triton_kernels).

Launchers take 2-D tensors and plain numbers; they know nothing of modules or autograd.
Run on CPU tensors under TRITON_INTERPRET=1 (how CI tests them).
"""
from .backward import grad_a, grad_input, grad_output_pass
from .dora import dora_grad_input, dora_grad_output_pass, dora_linear
from .dropout import dropout_keep_mask
from .forward import fused_linear, project, project_dropped

__all__ = ["project", "project_dropped", "fused_linear", "grad_output_pass", "grad_input", "grad_a",
           "dropout_keep_mask", "dora_linear", "dora_grad_output_pass", "dora_grad_input"]
