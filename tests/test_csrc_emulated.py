"""csrc/'s CUDA kernels, compiled as plain C++ with tests/cuda_emulation/emulation.h and run on
the CPU, against float64 PyTorch. This checks the kernels' indexing, tiling, masking, reductions
and barriers on machines without a GPU; tests/test_csrc.py checks the same kernels on a GPU."""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pairwise
import pytest
import torch
from lowrank_fused.dropout import DropoutSpec, keep_mask, quantised_p
from tolerance import assert_kernel_close

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

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
    lib.dropped_low_rank.argtypes = [ptr, c_int, ptr, ptr, c_int, i64, i64, i64, i64, i64, u64,
                                     f32]
    lib.keep_mask.argtypes = [ptr, i64, i64, u64, f32]
    lib.fail_next_launch.argtypes = [c_int]
    view = ctypes.POINTER(Matrix)
    for name, argtypes in [("op_project", [view, view, view, f32, u64, f32]),
                           ("op_grad_output_pass", [view, view, view, f32, view, view, view]),
                           ("op_grad_a", [view, view, view, i64, u64, f32]),
                           ("op_dropped_low_rank", [view, view, view, u64, f32])]:
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _keep(lib, m, k, seed, p):
    mask = torch.empty((m, k), dtype=torch.uint8)
    lib.keep_mask(mask.data_ptr(), m, k, seed, p)
    return mask.bool()


def _dropped(x, seed, p):
    """dropout(x) as the reference backend computes it (its own mask), in x's dtype."""
    if p == 0.0:
        return x
    spec = DropoutSpec(p, seed)
    keep = keep_mask(seed, p, torch.arange(x.shape[0]), torch.arange(x.shape[1]))
    return x * keep * spec.keep_scale


def _check(got, formula, inputs, dtype, what, same_math=None):
    """The kernel's ``got`` against ``formula`` of ``inputs`` in float64, within the tolerance
    rule (tests/tolerance.py): PyTorch's error is ``formula`` run on ``same_math`` (the inputs as
    the kernel multiplies them; default: as they are)."""
    want64 = formula(*(t.double() for t in inputs))
    assert_kernel_close(got, want64, formula(*(same_math or inputs)), what, dtype)


def _in_base(t, base_dtype):
    """t's values as the kernels multiply them over a ``base_dtype`` base: rounded to a 16-bit
    base's dtype (tensor-core operands), unchanged over fp32; t keeps its dtype."""
    return t if base_dtype == torch.float32 else t.to(base_dtype).to(t.dtype)


def _strided(x, layout):
    """x with the same values in another memory layout."""
    if layout == "transposed":
        return x.T.contiguous().T
    if layout == "every_other_column":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


# Every pair of levels at least once (the full product under LOWRANK_FUSED_EXHAUSTIVE=1):
# tests/pairwise.py.
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
               (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]
PROJECTION_CASES = [
    # (M, K, R, x dtype, adapter dtype, dropout p, x layout)
    (m, k, r, dt, adt, p, layout)
    for (m, k), r, (dt, adt), (p, layout) in pairwise.cases(dict(
        mk=[(1, 100), (37, 100), (130, 64)], r=[1, 12, 25, 64, 80], dtypes=DTYPE_PAIRS,
        p_layout=[(0.0, "contiguous"), (0.25, "contiguous"), (0.0, "transposed")]))
]


@pytest.mark.parametrize("m,k,r,dtype,adapter_dtype,p,layout", PROJECTION_CASES)
def test_projection(lib, m, k, r, dtype, adapter_dtype, p, layout):
    x = _strided(_rand(m, k, dtype=dtype, seed=1), layout)
    a = _rand(r, k, dtype=adapter_dtype, seed=2)
    out = torch.full((m, r), float("nan"), dtype=adapter_dtype)
    lib.rank_pass(x.data_ptr(), CODES[dtype], x.stride(0), x.stride(1), a.data_ptr(),
                  CODES[adapter_dtype], a.stride(0), a.stride(1), None, 0, out.data_ptr(),
                  CODES[adapter_dtype], None, None, m, k, r, 1.0, 7, quantised_p(p))
    _check(out, lambda x, a: _dropped(x, 7, p).to(a.dtype) @ a.T, (x, a), dtype, "P",
           same_math=(x, _in_base(a, dtype)))


GRAD_OUTPUT_CASES = [
    (m, n, r, dt, adt, outputs)
    for (m, n), r, (dt, adt), outputs in pairwise.cases(dict(
        mn=[(37, 80), (130, 96)], r=[1, 12, 25, 64, 80], dtypes=DTYPE_PAIRS,
        outputs=["dp+db+dbias", "db only"]))
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
    if with_dp:
        _check(dp, lambda g, b: scaling * (g.to(b.dtype) @ b), (g, b), dtype, "dP",
               same_math=(g, _in_base(b, dtype)))
        _check(dbias, lambda g: g.sum(0), (g,), dtype, "dbias")
    else:
        assert torch.isnan(dp).all(), "dP was written although not asked for"
    _check(db, lambda g, p: scaling * (g.to(p.dtype).T @ p), (g, p), dtype, "dB",
           same_math=(g, _in_base(p, dtype)))


@pytest.mark.parametrize("layout,dtype,r,p,splits", pairwise.cases(dict(
    layout=["contiguous", "every_other_column"],
    dtype=[torch.float32, torch.bfloat16, torch.float16], r=[1, 12, 25, 64, 80], p=[0.0, 0.25],
    splits=[1, 3])))
def test_grad_a(lib, dtype, r, p, splits, layout):
    m, k = 101, 100
    x = _strided(_rand(m, k, dtype=dtype, seed=6), layout)
    dp = _rand(m, r, dtype=torch.float32, seed=7)
    da = torch.zeros((r, k), dtype=torch.float32)
    lib.grad_a(dp.data_ptr(), x.data_ptr(), CODES[dtype], x.stride(0), x.stride(1),
               da.data_ptr(), m, k, r, splits, 11, quantised_p(p))
    # over a 16-bit x, dP is rounded to x's dtype at load (tensor cores)
    _check(da, lambda dp, x: dp.T @ _dropped(x, 11, p).to(dp.dtype), (dp, x), dtype, "dA",
           same_math=(_in_base(dp, dtype), x))


# m: one block of rows; three, the last ragged
@pytest.mark.parametrize("m,dtype,adapter_dtype,r,p", [
    (m, dt, adt, r, p) for m, (dt, adt), r, p in pairwise.cases(dict(
        m=[37, 133], dtypes=DTYPE_PAIRS, r=[1, 12, 25, 64, 80], p=[0.0, 0.25]))])
def test_dropped_low_rank(lib, m, dtype, adapter_dtype, r, p):
    k = 100
    out = torch.full((m, k), float("nan"), dtype=dtype)  # written, never read
    dp = _rand(m, r, dtype=torch.float32, seed=9)
    a = _rand(r, k, dtype=adapter_dtype, seed=10)
    lib.dropped_low_rank(out.data_ptr(), CODES[dtype], dp.data_ptr(), a.data_ptr(),
                         CODES[adapter_dtype], a.stride(0), a.stride(1), m, k, r, 13,
                         quantised_p(p))
    # over a 16-bit out, dP and A are rounded to out's dtype at load (tensor cores)
    _check(out, lambda dp, a: _dropped(dp.to(a.dtype) @ a, 13, p), (dp, a), dtype, "drop(dP·A)",
           same_math=(_in_base(dp, dtype), _in_base(a, dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_low_rank_of_rank_zero_writes_zeros(lib, dtype):
    out = torch.full((5, 7), float("nan"), dtype=dtype)
    lib.dropped_low_rank(out.data_ptr(), CODES[dtype], torch.empty((5, 0)).data_ptr(),
                         torch.empty((0, 7)).data_ptr(), 0, 7, 1, 5, 7, 0, 13, 0.25)
    assert (out == 0).all()


@pytest.mark.parametrize("seed", [0, 21, 2 ** 31 - 2, 2 ** 33 + 5])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_mask_is_the_reference_mask(lib, seed, p):
    for m, k in [(1, 1), (37, 100), (130, 257)]:
        want = keep_mask(seed, p, torch.arange(m), torch.arange(k))
        assert torch.equal(_keep(lib, m, k, seed, quantised_p(p)), want), (m, k)


def test_dropped_nan_gives_nan_like_the_reference(lib):
    m, k, r, seed, p = 32, 64, 3, 8, 0.5
    x = _rand(m, k, dtype=torch.float32, seed=1)
    x[:, 5] = float("nan")
    a = _rand(r, k, dtype=torch.float32, seed=2)
    assert not keep_mask(seed, p, torch.arange(m), torch.arange(k))[:, 5].all()
    out = torch.zeros((m, r))
    lib.rank_pass(x.data_ptr(), 0, k, 1, a.data_ptr(), 0, k, 1, None, 0, out.data_ptr(), 0, None,
                  None, m, k, r, 1.0, seed, quantised_p(p))
    assert out.isnan().all() and (_dropped(x, seed, p) @ a.T).isnan().all()


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


class Matrix(ctypes.Structure):
    """csrc/op_arguments.h's Matrix: a strided 2-D view, a 1-D tensor of n elements as n x 1."""
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("stride_r", ctypes.c_int64),
                ("stride_c", ctypes.c_int64)]


def _view(t):
    """What bindings.cpp's view() makes of a tensor; None for an absent optional."""
    if t is None:
        return None
    assert t.dim() in (1, 2), t.shape
    matrix = t.dim() == 2
    return ctypes.byref(Matrix(t.data_ptr(), CODES[t.dtype], t.shape[0],
                               t.shape[1] if matrix else 1, t.stride(0),
                               t.stride(1) if matrix else 1))


def _raise_on_error(error):
    """The error bindings.cpp raises: a failed launch as RuntimeError, bad arguments as
    ValueError."""
    if error is not None:
        message = error.decode()
        failed_launch = message.startswith("lowrank_fused_C: launch of ")
        raise (RuntimeError if failed_launch else ValueError)(message)


class EmulatedOps:
    """torch.ops.lowrank_fused_C (csrc/bindings.cpp) on CPU tensors, over the emulated kernels:
    the same allocation as the bindings, then the same argument handling and launches
    (csrc/op_arguments.h, compiled into the shim), so the backend's glue and the marshalling are
    what is tested."""

    def __init__(self, lib):
        self.lib = lib
        self.grad_a_splits = []

    def project(self, x, f, scale, seed, p, out_dtype, stream):
        out = torch.empty((x.shape[0], f.shape[0]), dtype=out_dtype)
        _raise_on_error(self.lib.op_project(_view(x), _view(f), _view(out), scale, seed, p))
        return out

    def grad_output_pass(self, g, b, p, scale, need_dp, db, dbias, stream):
        dp = torch.empty((g.shape[0] if need_dp else 0, b.shape[1]), dtype=torch.float32)
        _raise_on_error(self.lib.op_grad_output_pass(
            _view(g), _view(b), _view(p), scale, _view(dp) if need_dp else None, _view(db),
            _view(dbias)))
        return dp

    def grad_a(self, dp, x, seed, p, splits, stream):
        self.grad_a_splits.append(splits)
        da = torch.zeros((dp.shape[1], x.shape[1]), dtype=torch.float32)
        _raise_on_error(self.lib.op_grad_a(_view(dp), _view(x), _view(da), splits, seed, p))
        return da

    def dropped_low_rank(self, dp, a, seed, p, out_dtype, stream):
        out = torch.empty((dp.shape[0], a.shape[1]), dtype=out_dtype)
        _raise_on_error(self.lib.op_dropped_low_rank(_view(out), _view(dp), _view(a), seed, p))
        return out

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


@pytest.mark.parametrize("deterministic,m,r,p,dtype,adapter_dtype", [
    (det, m, r, p, dt, adt) for det, (m, r, p), (dt, adt) in pairwise.cases(dict(
        deterministic=[False, True],
        mrp=[(1, 1, 0.2), (37, 25, 0.0), (37, 25, 0.2), (130, 64, 0.2),
             (600, 12, 0.0)],  # M = 600: dA split in two
        dtypes=DTYPE_PAIRS))])
def test_cuda_backend_glue_matches_reference(cuda_backend, m, r, dtype, adapter_dtype, p,
                                             deterministic):
    check_glue(cuda_backend, m, r, dtype, adapter_dtype, p, deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
def test_cuda_backend_glue_with_a_latent_matches_reference(cuda_backend, dtype, adapter_dtype,
                                                           deterministic):
    # LoRA-XS's R (trainable A and B too): the pass over G on B and P·R, then dP and dR from it
    check_glue(cuda_backend, 37, 25, dtype, adapter_dtype, 0.2, deterministic, with_latent=True)


def check_glue(cuda_backend, m, r, dtype, adapter_dtype, p, deterministic, with_latent=False):
    """The cuda backend against the spec in float64, within the tolerance rule; the spec takes
    the mask of the project's definition, which is the kernels' mask bit for bit. Over a 16-bit
    base the kernels multiply the low-rank operands in the base's dtype, so PyTorch's
    low-precision run of the same math is the reference with the adapters in the base dtype (as
    in test_triton.py)."""
    from lowrank_fused import spec
    from lowrank_fused.backends import pytorch as reference
    from lowrank_fused.dropout import DropoutSpec

    k, n, scaling = 100, 80, 0.5
    x = _rand(m, k, dtype=dtype, seed=1)
    weight = _rand(n, k, dtype=dtype, seed=2) * k ** -0.5
    bias = _rand(n, dtype=dtype, seed=3)
    lora_a = _rand(r, k, dtype=adapter_dtype, seed=4) * k ** -0.5
    lora_b = _rand(n, r, dtype=adapter_dtype, seed=5) * r ** -0.5
    grad_y = _rand(m, n, dtype=dtype, seed=6)
    dropout = DropoutSpec(p=p, seed=17) if p else None
    latent = _rand(r, r, dtype=adapter_dtype, seed=7) * r ** -0.5 if with_latent else None
    adapters_in_base = (lambda t: t.to(dtype)) if dtype != torch.float32 else (lambda t: t)
    results = {}
    runs = (("reference", reference, lambda t: t, lambda t: t),
            ("same math", reference, lambda t: t, adapters_in_base),
            ("cuda", cuda_backend, lambda t: t, lambda t: t))
    for name, backend, cast, cast_adapter in runs:
        x_, w_, bias_, g_ = map(cast, (x, weight, bias, grad_y))
        a_, b_ = map(cast_adapter, (lora_a, lora_b))
        r_ = cast_adapter(latent) if with_latent else None
        b_eff = b_ @ r_.T if with_latent else b_  # what the ops hand the forward
        torch.use_deterministic_algorithms(deterministic)
        try:
            y, saved_p = backend.forward(x_, w_, bias_, a_, b_eff, scaling, dropout)
            grads = backend.backward(g_, x_, saved_p, w_, a_, b_, scaling, dropout, latent=r_,
                                     need_x=True, need_a=True, need_b=True,
                                     need_latent=with_latent, need_bias=True)
        finally:
            torch.use_deterministic_algorithms(False)
        results[name] = {what: t for what, t in zip(("y", "p", "dx", "da", "db", "dr", "dbias"),
                                                    (y, saved_p) + grads) if t is not None}
    x64, w64, bias64, g64, a64, b64 = (t.double()
                                       for t in (x, weight, bias, grad_y, lora_a, lora_b))
    truth = dict(bias=bias64, latent=latent.double() if with_latent else None, scaling=scaling,
                 keep=spec.keep_mask(x.shape, 17, p) if p else None, dropout_p=p)
    y64, p64 = spec.forward(x64, w64, a64, b64, **truth)
    grads64 = spec.backward(g64, x64, w64, a64, b64, **truth)
    results["float64"] = dict(y=y64, p=p64, dx=grads64.dx, da=grads64.da, db=grads64.db,
                              dr=grads64.dr, dbias=grads64.dbias)
    assert ("dr" in results["cuda"]) == with_latent
    for what, torch_low in results["same math"].items():
        got = results["cuda"][what]
        assert got.dtype == results["reference"][what].dtype, what
        assert_kernel_close(got, results["float64"][what], torch_low, what, dtype)
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


# ---- the ops' argument handling (csrc/op_arguments.h, shared with bindings.cpp) ----------------


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed", "every_other_column"])
@pytest.mark.parametrize("g_layout", ["contiguous", "transposed"])
def test_op_grad_output_pass_reads_any_layout(lib, g_layout, b_layout):
    m, n, r, scaling = 37, 48, 12, 0.5
    g = _strided(_rand(m, n, dtype=torch.float32, seed=3), g_layout)
    b = _strided(_rand(n, r, dtype=torch.float32, seed=4), b_layout)
    p = _rand(m, r, dtype=torch.float32, seed=5)
    db = torch.zeros((n, r))
    dbias = torch.zeros((n,))
    dp = EmulatedOps(lib).grad_output_pass(g, b, p, scaling, True, db, dbias, 0)
    _check(dp, lambda g, b: scaling * g @ b, (g, b), torch.float32, "dP")
    _check(db, lambda g, p: scaling * g.T @ p, (g, p), torch.float32, "dB")
    _check(dbias, lambda g: g.sum(0), (g,), torch.float32, "dbias")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every_other_column"])
def test_op_project_grad_a_and_dropped_low_rank_read_any_layout(lib, layout):
    m, k, r, seed, p = 37, 40, 12, 5, 0.25
    ops = EmulatedOps(lib)
    x = _strided(_rand(m, k, dtype=torch.bfloat16, seed=1), layout)
    a = _strided(_rand(r, k, dtype=torch.float32, seed=2), layout)
    dp = _rand(m, r, dtype=torch.float32, seed=3)
    a16, dp16 = _in_base(a, torch.bfloat16), _in_base(dp, torch.bfloat16)
    _check(ops.project(x, a, 0.5, seed, p, torch.float32, 0),
           lambda x, a: 0.5 * _dropped(x, seed, p).to(a.dtype) @ a.T, (x, a), torch.bfloat16, "P",
           same_math=(x, a16))
    _check(ops.grad_a(dp, x, seed, p, 2, 0),
           lambda dp, x: dp.T @ _dropped(x, seed, p).to(dp.dtype), (dp, x), torch.bfloat16, "dA",
           same_math=(dp16, x))
    _check(ops.dropped_low_rank(dp, a, seed, p, torch.bfloat16, 0),
           lambda dp, a: _dropped(dp @ a, seed, p), (dp, a), torch.bfloat16, "drop(dP·A)",
           same_math=(dp16, a16))


def test_op_arguments_are_checked(lib):
    ops = EmulatedOps(lib)
    x, a = torch.zeros((4, 8)), torch.zeros((3, 8))
    with pytest.raises(ValueError, match=r"project: input \(M, K\) and f \(R, K\)"):
        ops.project(x, torch.zeros((3, 9)), 1.0, 0, 0.0, torch.float32, 0)
    g, b, p = torch.zeros((4, 6)), torch.zeros((6, 3)), torch.zeros((4, 3))
    with pytest.raises(ValueError, match=r"grad_y \(M, N\) and b_eff \(N, R\)"):
        ops.grad_output_pass(g, torch.zeros((5, 3)), None, 1.0, True, None, None, 0)
    with pytest.raises(ValueError, match="db needs p"):
        ops.grad_output_pass(g, b, None, 1.0, True, torch.zeros((6, 3)), None, 0)
    with pytest.raises(ValueError, match=r"db must be a contiguous float32 \(6, 3\)"):
        ops.grad_output_pass(g, b, p, 1.0, True, torch.zeros((3, 6)).T, None, 0)
    with pytest.raises(ValueError, match=r"dbias must be a contiguous float32 \(6, 1\)"):
        ops.grad_output_pass(g, b, p, 1.0, True, None, torch.zeros((6,), dtype=torch.float16), 0)
    with pytest.raises(ValueError, match=r"grad_a: dp must be a contiguous float32 \(4, 3\)"):
        ops.grad_a(torch.zeros((4, 3), dtype=torch.float16), x, 0, 0.0, 1, 0)
    with pytest.raises(ValueError, match="splits must be >= 1, got 0"):
        ops.grad_a(torch.zeros((4, 3)), x, 0, 0.0, 0, 0)
    with pytest.raises(ValueError, match=r"dropped_low_rank: dp must be .* \(4, 5\)"):
        ops.dropped_low_rank(torch.zeros((4, 3)), torch.zeros((5, 8)), 0, 0.0, torch.float32, 0)


LAUNCH_OUT_OF_RESOURCES = 701  # cudaErrorLaunchOutOfResources


@pytest.mark.parametrize("dtype,kernel", [(torch.float32, "rank_pass_kernel<T, 16>"),
                                          (torch.bfloat16, "rank_pass_mma_kernel<T, 16>")])
def test_a_failed_launch_raises_naming_the_kernel(lib, dtype, kernel):
    # Checked right after the launch (cudaGetLastError), not in some later, unrelated op.
    ops = EmulatedOps(lib)
    x, a, dp = torch.zeros((4, 8), dtype=dtype), torch.zeros((3, 8)), torch.zeros((4, 3))
    lib.fail_next_launch(LAUNCH_OUT_OF_RESOURCES)
    with pytest.raises(RuntimeError, match=rf"launch of {re.escape(kernel)} failed: too many "
                                           "resources requested for launch"):
        ops.project(x, a, 1.0, 0, 0.0, torch.float32, 0)
    launches = [("grad_output_pass", lambda: ops.grad_output_pass(
                     torch.zeros((4, 6), dtype=dtype), torch.zeros((6, 3)), None, 1.0, True, None,
                     None, 0)),
                ("grad_a", lambda: ops.grad_a(dp, x, 0, 0.0, 1, 0)),
                ("dropped_low_rank", lambda: ops.dropped_low_rank(dp, a, 0, 0.0, dtype, 0))]
    for name, launch in launches:
        lib.fail_next_launch(LAUNCH_OUT_OF_RESOURCES)
        with pytest.raises(RuntimeError, match=r"lowrank_fused_C: launch of \w+kernel<"):
            launch()
        launch()  # the error was read once: the next launch goes through


def test_a_failed_launch_raises_through_the_backend(cuda_backend):
    x, w, a, b = torch.zeros((4, 8)), torch.zeros((5, 8)), torch.zeros((3, 8)), torch.zeros((5, 3))
    cuda_backend._ops.lib.fail_next_launch(LAUNCH_OUT_OF_RESOURCES)
    with pytest.raises(RuntimeError, match="launch of rank_pass_kernel<T, 16> failed"):
        cuda_backend.forward(x, w, None, a, b, 1.0, None)


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_forward_without_bias(cuda_backend, monkeypatch, dtype, p):
    """No bias: y is allocated uninitialised and the low-rank GEMM must not read it (beta = 0)."""
    from lowrank_fused import spec
    from lowrank_fused.backends import pytorch as reference
    from lowrank_fused.dropout import DropoutSpec

    m, k, n, r, scaling = 37, 100, 80, 12, 0.5
    x = _rand(m, k, dtype=dtype, seed=1)
    weight = _rand(n, k, dtype=dtype, seed=2) * k ** -0.5
    lora_a = _rand(r, k, dtype=torch.float32, seed=4) * k ** -0.5
    lora_b = _rand(n, r, dtype=torch.float32, seed=5) * r ** -0.5
    dropout = DropoutSpec(p=p, seed=17) if p else None
    with monkeypatch.context() as patched:  # uninitialised memory, made visible
        patched.setattr(torch.Tensor, "new_empty",
                        lambda self, shape: torch.full(shape, float("nan"), dtype=self.dtype))
        got, _ = cuda_backend.forward(x, weight, None, lora_a, lora_b, scaling, dropout)
    same_math = [t.to(dtype) for t in (lora_a, lora_b)]  # adapters in the base dtype
    torch_low, _ = reference.forward(x, weight, None, *same_math, scaling, dropout)
    want64, _ = spec.forward(*(t.double() for t in (x, weight, lora_a, lora_b)), scaling=scaling,
                             keep=spec.keep_mask(x.shape, 17, p) if p else None, dropout_p=p)
    assert_kernel_close(got, want64, torch_low, "y", dtype)
