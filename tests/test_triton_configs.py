"""Launch configurations (issue 16): the pruning rules, the autotuners' M buckets, and the kept
fp32 accumulators of the pass over G."""
import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed")

import triton  # noqa: E402
from lowrank_fused.triton_kernels import accumulators, backward, configs, fit, forward  # noqa: E402
from lowrank_fused.triton_kernels import interpreter, precision  # noqa: E402
from lowrank_fused.triton_kernels import grad_output_pass  # noqa: E402
from tolerance import assert_kernel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LIMITS = {"sm90": 227 * 1024, "sm80": 163 * 1024}
BASE_BYTES = (2, 4)  # bf16 / fp16, fp32


def _config(warps, stages, **meta):
    return triton.Config(meta, num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("family,generation", [(f, g) for f in sorted(configs.CONFIGS)
                                               for g in sorted(configs.CONFIGS[f])])
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
def test_every_rank_and_dtype_has_a_fitting_config(family, generation, dropout):
    # fitting_configs falls back to the smallest config when none fits; up to r = 128 no
    # fallback may be needed (the fallback would overflow shared memory or spill).
    table = configs.CONFIGS[family][generation]
    for rank in range(1, 129):
        for base_bytes in BASE_BYTES:
            block = configs.rank_block(rank)
            assert any(fit.fits(c, family, base_bytes, block, LIMITS[generation],
                                    generation, dropout)
                       for c in table), (family, generation, rank, base_bytes, dropout)


def test_dropout_prunes_the_tiles_that_spilled_with_its_mask():
    # configs.py's budgets: aot_check saw these spill with dropout only
    wide_4_warps = next(c for c in configs.CONFIGS["gemm"]["sm90"]
                        if c.num_warps == 4 and c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128)
    assert fit.fits(wide_4_warps, "gemm", 2, 16, LIMITS["sm90"], "sm90", False)
    assert not fit.fits(wide_4_warps, "gemm", 2, 16, LIMITS["sm90"], "sm90", True)
    wide_skinny = next(c for c in configs.CONFIGS["skinny"]["sm90"] if c.kwargs["BLOCK_N"] == 256)
    assert fit.fits(wide_skinny, "skinny", 2, 16, LIMITS["sm90"], "sm90", False)
    assert not fit.fits(wide_skinny, "skinny", 2, 16, LIMITS["sm90"], "sm90", True)


def test_fitting_configs_keep_only_what_fits():
    table = configs.CONFIGS["grad_output"]["sm90"]
    kept = fit.fitting_configs(table, "grad_output", 2, 128, LIMITS["sm90"])
    assert kept and len(kept) < len(table)
    assert all(fit.shared_memory_estimate(c, "grad_output", 2, 128) <= LIMITS["sm90"]
               for c in kept)
    assert all(fit.register_estimate(c, "grad_output", 128)
               <= fit.REGISTER_BUDGET["grad_output"] for c in kept)
    # past r = 128 the least shared memory stays rather than nothing
    assert len(fit.fitting_configs(table, "grad_output", 4, 512, LIMITS["sm80"])) == 1


@pytest.mark.parametrize("family", sorted(configs.CONFIGS))
def test_estimates_grow_with_every_tile_dimension(family):
    for config in [c for table in configs.CONFIGS[family].values() for c in table]:
        def smem(stages=config.num_stages, base=2, rank=32, **scale):
            meta = {k: v * scale.get(k, 1) for k, v in config.kwargs.items()}
            return fit.shared_memory_estimate(_config(config.num_warps, stages, **meta),
                                                  family, base, rank)
        assert smem() < smem(stages=config.num_stages + 1) < smem(stages=config.num_stages + 2)
        assert smem() < smem(base=4)
        assert smem() < smem(BLOCK_M=2) and smem() < smem(BLOCK_N=2)
        if family.removesuffix("_fp32") in ("gemm", "gemm_dual", "gemm_dora", "gemm_4bit", "gemm_4bit_dx"):
            assert smem() == smem(rank=128)  # the rank tiles reuse the K loop's buffers
        else:
            assert smem(rank=16) < smem(rank=32) < smem(rank=128)
        regs = lambda rank: fit.register_estimate(config, family, rank)  # noqa: E731
        assert regs(16) < regs(64) < regs(128)


# Measured by tools.aot_check (triton 3.6, `python -m tools.aot_check --report-only
# --json`): shared bytes the compiler allocated for the largest builds of each family, with the
# base dtype's bytes and the rank block of the build (fp32 adapters over bf16 unless noted).
MEASURED_SHARED = [
    # (family, (warps, stages, BLOCK_M, BLOCK_N[, BLOCK_K]), base bytes, rank block, bytes)
    ("grad_output", (8, 3, 128, 128), 2, 128, 327680),  # sm90 lora_fa
    ("grad_output", (8, 3, 128, 128), 2, 128, 294912),  # sm90 lora
    ("grad_output", (8, 4, 64, 256), 2, 16, 198656),  # sm90 lora_fa
    ("grad_output", (8, 3, 128, 128), 2, 64, 212992),  # sm90 lora_fa
    ("grad_output", (4, 4, 64, 128), 2, 64, 188416),  # sm90 lora_fa
    ("grad_output", (8, 2, 64, 128), 2, 128, 180224),  # sm90 lora_fa
    ("grad_output", (8, 3, 64, 64), 2, 128, 139264),  # sm90 lora_fa
    ("grad_output", (8, 2, 256, 128), 2, 16, 155648),  # sm90 lora_fa
    ("grad_output", (8, 3, 256, 64), 2, 16, 118784),  # sm90 lora_fa
    ("skinny", (8, 3, 128, 128), 2, 128, 262144),  # sm90 project, dropout
    ("skinny", (8, 3, 128, 128), 2, 128, 229376),  # sm90 grad_a / grad_b
    ("skinny", (8, 4, 64, 256), 2, 16, 188416),  # sm90 project
    ("skinny", (4, 4, 128, 64), 2, 64, 163840),  # sm90 grad_a, grad_b
    ("skinny", (4, 3, 128, 64), 2, 64, 114688),  # sm80 grad_a, dropout
    ("skinny", (8, 3, 64, 64), 2, 128, 106496),  # sm90 project, dropout
    ("gemm", (8, 3, 128, 256, 64), 2, 128, 147456),  # sm90 fused_linear, grad_input
    ("gemm", (4, 4, 128, 128, 64), 2, 128, 131072),  # sm90
]


@pytest.mark.parametrize("family, tiles, base_bytes, rank_block, measured", MEASURED_SHARED)
def test_shared_memory_estimate_never_below_a_compile(family, tiles, base_bytes, rank_block,
                                                      measured):
    warps, stages, block_m, block_n, *block_k = tiles
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    if block_k:
        meta.update(BLOCK_K=block_k[0], GROUP_M=8)
    estimate = fit.shared_memory_estimate(_config(warps, stages, **meta), family,
                                              base_bytes, rank_block)
    assert measured <= estimate <= 1.5 * measured


@pytest.mark.parametrize("family, tiles, rank_block", [
    # builds that spilled in tools.aot_check before the register rule
    ("gemm", (8, 3, 128, 256, 64), 128),  # fused_linear sm90, 44 B
    ("gemm", (4, 4, 128, 128, 64), 128),  # grad_input sm90, 580 B
    ("grad_output", (8, 3, 128, 128), 128),  # sm90 lora_fa, 52 B
    ("grad_output", (4, 3, 128, 64), 64),  # sm80 lora_fa, 24 B
    ("skinny", (4, 4, 128, 64), 64),  # sm90 grad_a 64 B, project (dropout) 24 B
    ("skinny", (4, 4, 64, 128), 64),  # sm90 grad_a, project (dropout) 8 B
    ("skinny", (8, 3, 128, 128), 128),  # sm90 grad_a 336 B, project 96 B
])
def test_register_rule_prunes_configs_that_spilled(family, tiles, rank_block):
    warps, stages, block_m, block_n, *block_k = tiles
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    if block_k:
        meta.update(BLOCK_K=block_k[0], GROUP_M=8)
    config = _config(warps, stages, **meta)
    assert not fit.fits(config, family, 2, rank_block, 10 ** 9)
    assert fit.fits(config, family, 2, 16, 10 ** 9)  # the same tiles at r = 16 stay


def _recorded_keys(monkeypatch, m):
    """{kernel name: its autotune key's values} for one forward and LoRA backward at M = m,
    with every launch recorded instead of run (meta tensors)."""
    from lowrank_fused.backends import triton as backend
    keys = {}

    def fake_launcher(kernel, family, key, reset_to_zero=None):
        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    named = dict(zip(kernel.arg_names, args), **kwargs)
                    keys[kernel.fn.__name__] = (tuple(key), tuple(named[k] for k in key))
                return launch
        return Launch(), {}

    for module in (forward, backward):
        monkeypatch.setattr(module, "launcher", fake_launcher)
    k, n, r = 64, 48, 8
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, weight = torch.empty(m, k, **meta), torch.empty(n, k, **meta)
    lora_a, lora_b = torch.empty(r, k, **meta), torch.empty(n, r, **meta)
    _, p = backend.forward(x, weight, None, lora_a, lora_b, 0.5, None)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            backend.backward(torch.empty(m, n, **meta), x, p, weight, lora_a, lora_b, 0.5, None,
                             need_x=True, need_a=True, need_b=True, need_bias=True)
        finally:
            torch.use_deterministic_algorithms(False)
    return keys


def test_autotune_keys_bucket_m(monkeypatch):
    # A new sequence length in the same power-of-two bucket must not re-tune any kernel.
    first, second, next_bucket = (_recorded_keys(monkeypatch, m) for m in (1000, 1024, 1025))
    assert set(first) == {"_project_kernel", "_fused_linear_kernel", "_grad_output_pass_kernel",
                          "_grad_input_kernel", "_grad_a_kernel", "_grad_b_kernel"}
    for name, (key, values) in first.items():
        assert "M_BUCKET" in key and "M" not in key and "rows_per_split" not in key, name
        assert second[name] == (key, values), name
        assert next_bucket[name] != (key, values), name


def _pass(g, b, p, scaling=0.5):
    _, db, dbias = grad_output_pass(g, b, p, scaling, need_dp=False, need_db=True,
                                    need_dbias=True, bias_dtype=g.dtype)
    return db, dbias


def _check_db(db, dbias, g, b, p, scaling=0.5):
    want_db = scaling * g.double().T @ p.double()
    low_db = (scaling * g.float().T @ p.float()).to(b.dtype)
    assert_kernel_close(db, want_db, low_db, "dB", b.dtype)
    assert_kernel_close(dbias, g.double().sum(0), g.float().sum(0).to(g.dtype), "dbias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kept_accumulators_give_independent_results(dtype):
    # Two passes in a row with the same shapes (two layers of one backward, or two steps): each
    # result is its own, so the accumulator was zero again for the second; and each is a fresh
    # tensor (autograd accumulates into, or keeps, what the backward returns).
    gen = torch.Generator().manual_seed(2)
    m, n, r = 70, 40, 12
    b = torch.randn(n, r, generator=gen).to(dtype).to(DEVICE)
    runs = []
    for _ in range(3):
        g = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
        p = torch.randn(m, r, generator=gen).to(dtype).to(DEVICE)
        runs.append((g, p, *_pass(g, b, p)))
    for g, p, db, dbias in runs:
        _check_db(db, dbias, g, b, p)
    results = [t for run in runs for t in run[2:]]
    assert len({t.data_ptr() for t in results}) == len(results)  # no two share memory
    for kept in accumulators._pool().values():
        assert not any(kept.data_ptr() == t.data_ptr() for t in results)
        assert not kept.any()  # left zeroed for the next call
    if dtype == torch.bfloat16 and (DEVICE == "cuda" or interpreter.interpreting()):
        assert ((n, r) in {key[2] for key in accumulators._pool()})  # the kept path ran


def test_a_failed_launch_does_not_return_its_accumulator(monkeypatch):
    g = torch.randn(16, 8).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(8, 4).to(torch.bfloat16).to(DEVICE)
    p = torch.randn(16, 4).to(torch.bfloat16).to(DEVICE)
    _pass(g, b, p)  # an accumulator of shape (8, 4) is now kept

    def failing_launcher(*args, **kwargs):
        raise RuntimeError("launch failed")
    monkeypatch.setattr(backward, "launcher", failing_launcher)
    with pytest.raises(RuntimeError, match="launch failed"):
        _pass(g, b, p)
    assert all(key[2] not in ((8, 4), (8,)) for key in accumulators._pool())
    monkeypatch.undo()
    _check_db(*_pass(g, b, p), g, b, p)


@pytest.fixture
def fp32_precision_restored():
    """Restores torch's global fp32-precision settings (the new API's and the legacy flag)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = (torch.backends.fp32_precision, matmul.fp32_precision)
    yield matmul
    torch.backends.fp32_precision = saved[0]
    matmul.fp32_precision = saved[1]


def test_dot_precision_follows_the_fp32_precision_api(fp32_precision_restored):
    # Reading the legacy allow_tf32 raises once the new API was used (transformers does).
    matmul = fp32_precision_restored
    matmul.fp32_precision = "tf32"
    assert precision.dot_precision(torch.float32) == "tf32"
    matmul.fp32_precision = "ieee"
    assert precision.dot_precision(torch.float32) == "ieee"
    # "none" inherits the generic setting
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert precision.dot_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert precision.dot_precision(torch.float32) == "ieee"
    assert precision.dot_precision(torch.bfloat16) == "tf32"  # 16-bit dots: the flag is moot
