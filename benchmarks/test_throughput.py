"""Layer throughput, forward and forward+backward, each case with its ratio to the bare frozen
nn.Linear of the same shape timed in the same run (extra_info["ratio_to_linear"])."""
import pytest
import torch

from benchmarks.conftest import DEVICE, DTYPE, RANKS, SHAPES, TOKENS
from tools.layers import METHODS, build, implementations
from tools.timing import median_ms
from lowrank_fused import dispatch

_linear_ms = {}


def _forward_only(layer, x):
    def fwd():
        with torch.no_grad():
            layer(x)
    return fwd


def _runner(layer, x, grad, mode):
    if mode == "forward":
        return _forward_only(layer, x)
    def fwd_bwd():
        layer(x).backward(grad)
    return fwd_bwd


def _inputs(k, n, m):
    torch.manual_seed(1)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    return x, grad


def linear_ms(shape_name, m, mode):
    """The bare frozen nn.Linear's time for this shape, measured once per run."""
    key = (shape_name, m, mode)
    if key not in _linear_ms:
        k, n = SHAPES[shape_name]
        x, grad = _inputs(k, n, m)
        _linear_ms[key] = median_ms(_runner(build("linear", k, n, 1, "lora", DTYPE, DEVICE), x,
                                            grad, mode), DEVICE)
    return _linear_ms[key]


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
    ms = median_ms(run, DEVICE)
    base_ms = linear_ms(shape_name, m, mode)
    benchmark.group = f"{shape_name} M={m} {mode}"
    benchmark.extra_info.update(shape=shape_name, K=k, N=n, M=m, rank=rank, impl=impl,
                                method=method, mode=mode, dtype=str(DTYPE), median_ms=ms,
                                linear_ms=base_ms, ratio_to_linear=ms / base_ms,
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda"
                                else "cpu",
                                arch=dispatch.gpu_arch(DEVICE) if DEVICE.type == "cuda"
                                else "cpu")
    benchmark(run)
