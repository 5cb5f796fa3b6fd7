"""Memory: saved-activation bytes per layer (exact on any device), peak allocated memory per layer
(GPU), and a LLaMA-style block stack swept over batch x sequence until it runs out of memory (GPU)."""
import pytest
import torch
from torch import nn

from benchmarks.conftest import DEVICE, DTYPE, ON_GPU, RANKS, SHAPES, TOKENS
from tools.layers import METHODS, build, implementations, peft_available, saved_activation_bytes
from tools.peak_memory import peak_extra_bytes
from lowrank_fused import apply_low_rank


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", implementations(DEVICE))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_layer_memory(benchmark, shape_name, impl, method):
    k, n = SHAPES[shape_name]
    m, rank = TOKENS[-1] if ON_GPU else TOKENS[0], RANKS[1] if len(RANKS) > 1 else RANKS[0]
    layer = build(impl, k, n, rank, method, DTYPE, DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    info = dict(shape=shape_name, K=k, N=n, M=m, rank=rank, impl=impl, method=method,
                saved_bytes=saved_activation_bytes(layer, x),
                x_bytes=x.numel() * x.element_size())
    if ON_GPU:
        info["peak_extra_bytes"] = peak_extra_bytes(lambda: _train_step(layer, x))
    benchmark.group = f"memory {shape_name}"
    benchmark.extra_info.update(info)
    benchmark(lambda: None)  # memory is the measurement; the timer records nothing of note


def _train_step(layer, x):
    """Forward and backward, then the gradients freed: each call allocates them anew."""
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


class LlamaBlock(nn.Module):
    """The seven projections of a LLaMA decoder block (attention itself left out: it is the
    same for every contender)."""

    def __init__(self, d, ff, device, dtype):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=dtype)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(d, d) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = lin(d, ff), lin(d, ff), lin(ff, d)

    def forward(self, x):
        h = self.q_proj(x) + self.k_proj(x) + self.v_proj(x)
        x = x + self.o_proj(h)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


STACK = dict(d=4096, ff=11008, layers=4, seq=2048) if ON_GPU else dict(d=64, ff=160, layers=2, seq=16)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _stack(contender):
    torch.manual_seed(0)
    model = nn.Sequential(*(LlamaBlock(STACK["d"], STACK["ff"], DEVICE, DTYPE)
                            for _ in range(STACK["layers"])))
    if contender == "peft":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    apply_low_rank(model, TARGETS, 16, contender.split("-", 1)[1])
    return model


def _fits(model, batch):
    try:
        x = torch.randn(batch, STACK["seq"], STACK["d"], device=DEVICE, dtype=DTYPE,
                        requires_grad=True)
        model(x).float().sum().backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if ON_GPU:
            torch.cuda.empty_cache()


@pytest.mark.parametrize("contender", (["peft"] if peft_available() else [])
                         + ["ours-lora", "ours-lora_fa", "ours-lora_xs"])
def test_stack_until_out_of_memory(benchmark, contender):
    model = _stack(contender)
    batch, largest = 1, 0
    limit = 4096 if ON_GPU else 2  # CPU: a smoke run, not a sweep to exhaustion
    while batch <= limit and _fits(model, batch):
        largest, batch = batch, batch * 2
    if ON_GPU and largest:
        low, high = largest, batch  # bisect between the last fit and the first failure
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if _fits(model, mid) else (low, mid)
        largest = low
    benchmark.group = "stack until out of memory"
    benchmark.extra_info.update(contender=contender, largest_batch=largest,
                                largest_tokens=largest * STACK["seq"], **STACK,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    benchmark(lambda: None)
    assert largest >= 1
