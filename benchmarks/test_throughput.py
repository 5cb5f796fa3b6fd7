"""Layer throughput, forward and forward+backward, each case with its ratio to the bare frozen
nn.Linear of the same shape timed with it, interleaved (extra_info["ratio_to_linear"]): the one
timer of tools/timing.py, as tools.first's matrix (CUDA events, L2 flushed, p20/p50/p80,
gradients set to None before every call)."""
import pytest
import torch

from benchmarks.conftest import DEVICE, DTYPE, RANKS, SHAPES, TOKENS
from tools.layers import METHODS, build, implementations
from tools import timing
from lowrank_fused import dispatch


def _forward_only(layer, x):
    def fwd():
        with torch.no_grad():
            layer(x)
    return fwd


def _runner(layer, x, grad, mode):
    """A timing.Timed of one call; fwd+bwd sets every gradient to None first (outside the
    timing), so no repeat adds into a kept .grad."""
    if mode == "forward":
        return timing.Timed(_forward_only(layer, x))

    def fwd_bwd():
        layer(x).backward(grad)
    return timing.Timed(fwd_bwd, timing.grads_to_none(x, layer))


def _inputs(k, n, m):
    torch.manual_seed(1)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    return x, grad


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", implementations(DEVICE))
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_layer(benchmark, shape_name, m, rank, impl, method, mode):
    if impl == "linear" and (method != "lora" or rank != RANKS[0]):
        pytest.skip("the bare linear has no method or rank: measured once per shape")
    k, n = SHAPES[shape_name]
    layer = build(impl, k, n, rank, method, DTYPE, DEVICE)
    x, grad = _inputs(k, n, m)
    run = _runner(layer, x, grad, mode)
    linear = _runner(build("linear", k, n, 1, "lora", DTYPE, DEVICE), x, grad, mode)
    got = timing.interleaved({"case": run, "linear": linear}, DEVICE)
    ms, base_ms = got["case"].p50, got["linear"].p50
    benchmark.group = f"{shape_name} M={m} {mode}"
    benchmark.extra_info.update(shape=shape_name, K=k, N=n, M=m, rank=rank, impl=impl,
                                method=method, mode=mode, dtype=str(DTYPE), median_ms=ms,
                                p20_ms=got["case"].p20, p80_ms=got["case"].p80,
                                linear_ms=base_ms, ratio_to_linear=ms / base_ms,
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda"
                                else "cpu",
                                arch=dispatch.gpu_arch(DEVICE) if DEVICE.type == "cuda"
                                else "cpu")
    benchmark(lambda: (run.before and run.before(), run.fn()))
