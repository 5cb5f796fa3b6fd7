"""csrc/'s CUDA kernels, compiled as plain C++ with tests/cuda_emulation/emulation.h and run on
the CPU, against float64 PyTorch. This checks the kernels' indexing, tiling, masking, reductions
and barriers on machines without a GPU; tests/test_csrc.py checks the same kernels on a GPU."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Relative to the largest reference value: fp32 sums differ in order only; half outputs round.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

i64, f32, u64, ptr, c_int = (ctypes.c_int64, ctypes.c_float, ctypes.c_uint64, ctypes.c_void_p,
                             ctypes.c_int)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("emulation") / "liblowrank_emulated.so"
    done = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror",
         "-Wno-unknown-pragmas", "-DLOWRANK_FUSED_EMULATION", "-include",
         str(EMULATION / "emulation.h"), "-x", "c++", str(ROOT / "csrc" / "lowrank_kernels.cu"),
         "-x", "none", str(EMULATION / "shim.cpp"), "-o", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    lib.rank_pass.argtypes = [ptr, c_int, i64, i64, ptr, c_int, i64, i64, ptr, c_int, ptr, c_int,
                              ptr, ptr, i64, i64, i64, f32, u64, f32]
    lib.grad_a.argtypes = [ptr, ptr, c_int, i64, i64, ptr, i64, i64, i64, c_int, u64, f32]
    lib.add_dropped_low_rank.argtypes = [ptr, c_int, ptr, ptr, c_int, i64, i64, i64, i64, i64,
                                         u64, f32]
    lib.keep_mask.argtypes = [ptr, i64, i64, u64, f32]
    return lib


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _keep(lib, m, k, seed, p):
    mask = torch.empty((m, k), dtype=torch.uint8)
    lib.keep_mask(mask.data_ptr(), m, k, seed, p)
    return mask.bool()


def _dropped(lib, x, seed, p):
    """dropout(x) with the kernels' mask, rounded to x's dtype like the reference, in float64."""
    if p == 0.0:
        return x.double()
    keep = _keep(lib, x.shape[0], x.shape[1], seed, p)
    return (x.float() * (1.0 / (1.0 - p))).to(x.dtype).double() * keep


def _assert_close(got, want, dtype, what):
    scale = want.abs().max().item() or 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale,
                               msg=lambda msg: f"{what}: {msg}")


def _strided(x, layout):
    """x with the same values in another memory layout."""
    if layout == "transposed":
        return x.T.contiguous().T
    if layout == "every_other_column":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


PROJECTION_CASES = [
    # (M, K, R, x dtype, adapter dtype, dropout p, x layout)
    (m, k, r, dt, adt, p, layout)
    for m, k in [(1, 100), (37, 100), (130, 64)]
    for r in (1, 12, 25, 64, 80)
    for dt, adt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                    (torch.float16, torch.float16)]
    for p, layout in [(0.0, "contiguous"), (0.25, "contiguous"), (0.0, "transposed")]
    if (m, r) != (130, 80) or dt == torch.float32  # the widest case once
]


@pytest.mark.parametrize("m,k,r,dtype,adapter_dtype,p,layout", PROJECTION_CASES)
def test_projection(lib, m, k, r, dtype, adapter_dtype, p, layout):
    x = _strided(_rand(m, k, dtype=dtype, seed=1), layout)
    a = _rand(r, k, dtype=adapter_dtype, seed=2)
    out = torch.full((m, r), float("nan"), dtype=adapter_dtype)
    lib.rank_pass(x.data_ptr(), CODES[dtype], x.stride(0), x.stride(1), a.data_ptr(),
                  CODES[adapter_dtype], a.stride(0), a.stride(1), None, 0, out.data_ptr(),
                  CODES[adapter_dtype], None, None, m, k, r, 1.0, 7, p)
    want = _dropped(lib, x, 7, p) @ a.double().T
    _assert_close(out, want, adapter_dtype, "P")


GRAD_OUTPUT_CASES = [
    (m, n, r, dt, adt, outputs)
    for m, n in [(37, 80), (130, 96)]
    for r in (1, 12, 25, 64, 80)
    for dt, adt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                    (torch.float16, torch.float16)]
    for outputs in ("dp+db+dbias", "db only")
]


@pytest.mark.parametrize("m,n,r,dtype,adapter_dtype,outputs", GRAD_OUTPUT_CASES)
def test_grad_output_pass(lib, m, n, r, dtype, adapter_dtype, outputs):
    g = _rand(m, n, dtype=dtype, seed=3)
    b = _rand(n, r, dtype=adapter_dtype, seed=4)
    p = _rand(m, r, dtype=adapter_dtype, seed=5)
    scaling = 0.5
    with_dp = outputs.startswith("dp")
    dp = torch.full((m, r), float("nan"), dtype=torch.float32)
    db = torch.zeros((n, r), dtype=torch.float32)
    dbias = torch.zeros((n,), dtype=torch.float32)
    # f = B_effᵀ through its strides
    lib.rank_pass(g.data_ptr(), CODES[dtype], g.stride(0), g.stride(1), b.data_ptr(),
                  CODES[adapter_dtype], b.stride(1), b.stride(0), p.data_ptr(),
                  CODES[adapter_dtype], dp.data_ptr() if with_dp else None, 0, db.data_ptr(),
                  dbias.data_ptr() if with_dp else None, m, n, r, scaling, 0, 0.0)
    gd = g.double()
    if with_dp:
        _assert_close(dp, scaling * gd @ b.double(), torch.float32, "dP")
        _assert_close(dbias, gd.sum(0), torch.float32, "dbias")
    else:
        assert torch.isnan(dp).all(), "dP was written although not asked for"
    _assert_close(db, scaling * gd.T @ p.double(), torch.float32, "dB")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("r", [1, 12, 25, 64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "every_other_column"])
def test_grad_a(lib, dtype, r, p, splits, layout):
    m, k = 101, 100
    x = _strided(_rand(m, k, dtype=dtype, seed=6), layout)
    dp = _rand(m, r, dtype=torch.float32, seed=7)
    da = torch.zeros((r, k), dtype=torch.float32)
    lib.grad_a(dp.data_ptr(), x.data_ptr(), CODES[dtype], x.stride(0), x.stride(1),
               da.data_ptr(), m, k, r, splits, 11, p)
    _assert_close(da, dp.double().T @ _dropped(lib, x, 11, p), torch.float32, "dA")


@pytest.mark.parametrize("r", [1, 12, 25, 64, 80])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
def test_add_dropped_low_rank(lib, dtype, adapter_dtype, r):
    m, k, p = 37, 100, 0.25
    dx = _rand(m, k, dtype=dtype, seed=8)
    dx0 = dx.double()
    dp = _rand(m, r, dtype=torch.float32, seed=9)
    a = _rand(r, k, dtype=adapter_dtype, seed=10)
    lib.add_dropped_low_rank(dx.data_ptr(), CODES[dtype], dp.data_ptr(), a.data_ptr(),
                             CODES[adapter_dtype], a.stride(0), a.stride(1), m, k, r, 13, p)
    keep = _keep(lib, m, k, 13, p)
    want = dx0 + (dp.double() @ a.double()) * keep / (1.0 - p)
    _assert_close(dx, want, dtype, "dx")


def test_keep_mask_statistics_and_determinism(lib):
    m, k, p = 300, 500, 0.3
    mask = _keep(lib, m, k, 21, p)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(mask, _keep(lib, m, k, 21, p)), "same seed, different mask"
    assert not torch.equal(mask, _keep(lib, m, k, 22, p)), "different seeds, same mask"
    # rows are not copies of each other (index m·K + k, not k alone)
    assert not torch.equal(mask[0], mask[1])
    assert _keep(lib, m, k, 21, 0.0).all()


def test_empty_reduction_writes_zeros(lib):
    """N = 0 (an empty G row): dP is an empty sum, so zeros, not whatever memory held."""
    m, r = 5, 3
    g = torch.empty((m, 0))
    b = torch.empty((0, r))
    dp = torch.full((m, r), float("nan"))
    lib.rank_pass(g.data_ptr(), 0, 0, 1, b.data_ptr(), 0, 1, r, None, 0, dp.data_ptr(), 0, None,
                  None, m, 0, r, 1.0, 0, 0.0)
    assert (dp == 0).all()


def test_empty_inputs_write_nothing(lib):
    out = torch.full((0, 4), 1.0)
    x = torch.empty((0, 100))
    a = _rand(4, 100, dtype=torch.float32, seed=1)
    lib.rank_pass(x.data_ptr(), 0, 100, 1, a.data_ptr(), 0, 100, 1, None, 0, out.data_ptr(), 0,
                  None, None, 0, 100, 4, 1.0, 0, 0.0)
    da = torch.full((4, 100), 3.0)
    lib.grad_a(torch.empty((0, 4)).data_ptr(), x.data_ptr(), 0, 100, 1, da.data_ptr(), 0, 100, 4,
               1, 0, 0.0)
    assert (da == 3.0).all(), "dA with M = 0 must be left to the caller's zeros"


# ---- backends/cuda.py on the emulated kernels -------------------------------------------------


class EmulatedOps:
    """torch.ops.lowrank_fused_C (csrc/bindings.cpp) on CPU tensors, over the emulated kernels:
    the same allocation and arguments as the bindings, so the backend's glue is what is tested."""

    def __init__(self, lib):
        self.lib = lib
        self.grad_a_splits = []

    def project(self, x, f, scale, seed, p, out_dtype, stream):
        out = torch.empty((x.shape[0], f.shape[0]), dtype=out_dtype)
        self.lib.rank_pass(x.data_ptr(), CODES[x.dtype], x.stride(0), x.stride(1), f.data_ptr(),
                           CODES[f.dtype], f.stride(0), f.stride(1), None, 0, out.data_ptr(),
                           CODES[out_dtype], None, None, x.shape[0], x.shape[1], f.shape[0],
                           scale, seed, p)
        return out

    def grad_output_pass(self, g, b, p, scale, need_dp, db, dbias, stream):
        m, n = g.shape
        r = b.shape[1]
        dp = torch.empty((m if need_dp else 0, r), dtype=torch.float32)
        self.lib.rank_pass(g.data_ptr(), CODES[g.dtype], g.stride(0), g.stride(1), b.data_ptr(),
                           CODES[b.dtype], b.stride(1), b.stride(0),
                           p.data_ptr() if db is not None else None,
                           CODES[p.dtype] if db is not None else 0,
                           dp.data_ptr() if need_dp else None, 0,
                           db.data_ptr() if db is not None else None,
                           dbias.data_ptr() if dbias is not None else None, m, n, r, scale, 0,
                           0.0)
        return dp

    def grad_a(self, dp, x, seed, p, splits, stream):
        self.grad_a_splits.append(splits)
        da = torch.zeros((dp.shape[1], x.shape[1]), dtype=torch.float32)
        self.lib.grad_a(dp.data_ptr(), x.data_ptr(), CODES[x.dtype], x.stride(0), x.stride(1),
                        da.data_ptr(), x.shape[0], x.shape[1], dp.shape[1], splits, seed, p)
        return da

    def add_dropped_low_rank_(self, dx, dp, a, seed, p, stream):
        assert dx.is_contiguous()
        self.lib.add_dropped_low_rank(dx.data_ptr(), CODES[dx.dtype], dp.data_ptr(),
                                      a.data_ptr(), CODES[a.dtype], a.stride(0), a.stride(1),
                                      dx.shape[0], dx.shape[1], a.shape[0], seed, p)

    def keep_mask(self, like, rows, cols, seed, p, stream):
        return _keep(self.lib, rows, cols, seed, p)


@pytest.fixture
def cuda_backend(lib, monkeypatch):
    """lowrank_fused.backends.cuda imported against a stand-in extension and run on the CPU."""
    import importlib
    import sys
    import types

    monkeypatch.setitem(sys.modules, "lowrank_fused._C", types.ModuleType("lowrank_fused._C"))
    monkeypatch.delitem(sys.modules, "lowrank_fused.backends.cuda", raising=False)
    module = importlib.import_module("lowrank_fused.backends.cuda")
    # leave no stand-in behind for the other tests
    monkeypatch.delitem(sys.modules, "lowrank_fused.backends.cuda")
    monkeypatch.setattr(module, "_ops", EmulatedOps(lib))
    monkeypatch.setattr(module, "_current", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(module, "_stream", lambda device: 0)
    monkeypatch.setattr(module, "_multiprocessors", lambda index: 4)
    return module


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("m,r,p", [(1, 1, 0.2), (37, 25, 0.0), (37, 25, 0.2), (130, 64, 0.2),
                                   (600, 12, 0.0)])  # M = 600: dA split in two
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
def test_cuda_backend_glue_matches_reference(cuda_backend, monkeypatch, m, r, dtype,
                                             adapter_dtype, p, deterministic):
    from lowrank_fused.backends import reference
    from lowrank_fused.dropout import DropoutSpec

    monkeypatch.setattr(reference, "dropout_keep_mask", cuda_backend.dropout_keep_mask)
    k, n, scaling = 100, 80, 0.5
    x = _rand(m, k, dtype=dtype, seed=1)
    weight = _rand(n, k, dtype=dtype, seed=2) * k ** -0.5
    bias = _rand(n, dtype=dtype, seed=3)
    lora_a = _rand(r, k, dtype=adapter_dtype, seed=4) * k ** -0.5
    lora_b = _rand(n, r, dtype=adapter_dtype, seed=5) * r ** -0.5
    grad_y = _rand(m, n, dtype=dtype, seed=6)
    dropout = DropoutSpec(p=p, seed=17) if p else None
    results = {}
    for name, backend in (("reference", reference), ("cuda", cuda_backend)):
        torch.use_deterministic_algorithms(deterministic)
        try:
            y, saved_p = backend.forward(x, weight, bias, lora_a, lora_b, scaling, dropout)
            grads = backend.backward(grad_y, x, saved_p, weight, lora_a, lora_b, scaling,
                                     dropout, need_x=True, need_a=True, need_b=True,
                                     need_bias=True)
        finally:
            torch.use_deterministic_algorithms(False)
        results[name] = dict(zip(("y", "p", "dx", "da", "db", "dbias"), (y, saved_p) + grads))
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    for what, want in results["reference"].items():
        got = results["cuda"][what]
        assert got.dtype == want.dtype and got.shape == want.shape, what
        torch.testing.assert_close(got.double(), want.double(), rtol=tol,
                                   atol=tol * (want.abs().max().item() or 1.0),
                                   msg=lambda msg: f"{what}: {msg}")
    if m == 600:
        expected = 1 if deterministic else 2
        assert cuda_backend._ops.grad_a_splits == [expected]


def test_grad_a_splits_fill_the_gpu_without_tiny_ranges(cuda_backend):
    splits = cuda_backend.grad_a_splits
    assert splits(8192, 4096, 64, 132) == 5  # 64 column blocks x 5 >= 2 per multiprocessor
    assert splits(100, 4096, 64, 132) == 1  # too few rows to split
    assert splits(8192, 65536, 16, 132) == 1  # 1024 column blocks already fill the GPU
    for m, k, r in [(1, 1, 1), (300, 100, 80), (32768, 1024, 8)]:
        got = splits(m, k, r, 132)
        assert 1 <= got and (got == 1 or m // got >= 256)
