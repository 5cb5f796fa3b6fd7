"""The dropout keep-mask: one definition (lowrank_fused/dropout.py), the same bits on every
backend, and the statistics of a fair coin per element."""
import math

import pytest
import torch

from lowrank_fused.backends import pytorch as reference
import lowrank_fused.dropout as dropout_module
from lowrank_fused.dropout import (DropoutSpec, fast_keep_mask, keep_mask, keep_mask_chunks,
                                   keep_threshold, quantised_p)

try:
    import triton
    import triton.language as tl
    from lowrank_fused.triton_kernels import dropout_keep_mask
    from lowrank_fused.triton_kernels.dropout import keep_pairs, pair_columns
except ImportError:  # the reference tests still run
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="the triton package is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mask(seed, p, m, k, row0=0, col0=0):
    return keep_mask(seed, p, torch.arange(row0, row0 + m), torch.arange(col0, col0 + k))


def _scalar_keep(seed, p, row, col):
    """The docstring's definition for one element, in Python integers."""
    def tail(x):
        x = x * 0x7FEB352D & 0xFFFFFFFF
        x ^= x >> 15
        x = x * 0x846CA68B & 0xFFFFFFFF
        return x ^ (x >> 16)

    def mix(x):
        return tail(x ^ (x >> 16))

    s = seed & 0xFFFFFFFF
    group, lane = divmod(col, 32)
    pair = group * 16 + lane % 16
    col_key = (pair * 0x9E3779B9 + mix(s ^ 0x9E3779B9)) & 0xFFFFFFFF
    h = tail(mix(row ^ mix(s)) ^ col_key)
    bits = h >> 16 if lane >= 16 else h & 0xFFFF
    return bits >= round(p * 2 ** 16)


def test_torch_mask_is_the_written_definition():
    for seed, p in [(7, 0.5), (2 ** 40 + 3, 0.1), (123456, 0.05)]:
        got = _mask(seed, p, 5, 70, row0=2 ** 20, col0=2 ** 31 - 40)
        want = [[_scalar_keep(seed, p, 2 ** 20 + r, 2 ** 31 - 40 + c) for c in range(70)]
                for r in range(5)]
        assert got.tolist() == want


def test_columns_16_apart_share_a_hash_but_not_its_bits():
    """Columns c and c + 16 of a 32-group read the two halves of one hash: with p = 0.5 each is
    still a fair, independent coin (no correlation between the partners, nor across groups)."""
    m, k = 2000, 256
    keep = _mask(13, 0.5, m, k).double()
    groups = keep.view(m, k // 32, 2, 16)
    bound = 5 / math.sqrt(groups[:, :, 0].numel())
    assert abs(_corr(groups[:, :, 0], groups[:, :, 1])) < bound, "pair partners correlate"
    assert abs(_corr(groups[:, 1:, 0], groups[:, :-1, 1])) < bound, "neighbouring groups"
    # the two halves are different bits of the hash, not one bit read twice
    assert not torch.equal(groups[:, :, 0], groups[:, :, 1])


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_within_a_few_standard_errors(p):
    m, k = 512, 1000
    keep = _mask(3, p, m, k)
    q = quantised_p(p)
    se = math.sqrt(q * (1 - q) / (m * k))
    assert abs((1 - keep.float().mean().item()) - q) < 4 * se
    # every row and every column drops about p, too (no row or column stuck)
    rows = 1 - keep.float().mean(1)
    assert (rows - q).abs().max() < 6 * math.sqrt(q * (1 - q) / k)


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_rows_columns_and_seeds_uncorrelated():
    m, k = 400, 400
    keep = _mask(11, 0.5, m, k)
    bound = 5 / math.sqrt(m * k)  # about 5 standard errors of a correlation of m·k pairs
    assert abs(_corr(keep[1:], keep[:-1])) < bound * 1.01, "neighbouring rows correlate"
    assert abs(_corr(keep[:, 1:], keep[:, :-1])) < bound * 1.01, "neighbouring columns correlate"
    assert abs(_corr(keep, keep.T)) < bound, "mask correlates with its transpose"
    other = _mask(12, 0.5, m, k)
    assert abs(_corr(keep, other)) < bound, "seeds 11 and 12 correlate"
    # a seed is not a shift of another seed's rows or columns
    assert abs(_corr(keep[1:], other[:-1])) < bound * 1.01
    assert abs(_corr(keep[:, 1:], other[:, :-1])) < bound * 1.01


def test_no_repetition_past_2_to_the_31_elements():
    """Rows and columns enter the hash separately, so rows far apart (element offsets past
    2^31 and 2^32 for K = 4096) give masks of their own, never a copy of row 0's."""
    k = 4096
    first = _mask(5, 0.5, 1, k)[0]
    for row in (2 ** 31 // k, 2 ** 32 // k, 2 ** 20 + 1, 2 ** 31 - 1):
        far = _mask(5, 0.5, 1, k, row0=row)[0]
        assert not torch.equal(far, first), row
        assert abs(_corr(far, first)) < 5 / math.sqrt(k)
    # a view at a row offset is the same as the corresponding rows of a larger mask
    assert torch.equal(_mask(5, 0.5, 3, 70, row0=100, col0=30), _mask(5, 0.5, 103, 100)[100:, 30:])


def test_p_is_quantised_to_16_bits_and_the_scale_uses_it():
    assert keep_threshold(0.5) == 2 ** 15
    assert quantised_p(0.1) == round(0.1 * 2 ** 16) / 2 ** 16
    assert abs(quantised_p(0.1) - 0.1) <= 2 ** -17
    spec = DropoutSpec(0.1, 1)
    assert spec.keep_scale == 1 / (1 - quantised_p(0.1))
    assert quantised_p(1 - 1e-12) < 1  # never drops everything
    # the quantised p is exact in float32, so every backend derives the same threshold
    assert float(torch.tensor(quantised_p(0.3), dtype=torch.float32)) == quantised_p(0.3)


def test_reference_backend_uses_the_definition():
    got = reference.dropout_keep_mask(DropoutSpec(0.3, 9), (17, 33), torch.device("cpu"))
    assert torch.equal(got, _mask(9, 0.3, 17, 33))


def test_dropped_nan_and_inf_give_nan_as_f_dropout():
    x = torch.tensor([[float("nan"), float("inf"), 1.0, -float("inf")]]).repeat(64, 1)
    spec = DropoutSpec(0.5, 4)
    out = reference._apply_dropout(x, spec)
    keep = reference.dropout_keep_mask(spec, x.shape, x.device)
    assert (~keep[:, 0]).any() and (~keep[:, 1]).any()
    assert out[:, 0].isnan().all()
    assert out[~keep[:, 1], 1].isnan().all() and out[keep[:, 1], 1].isinf().all()
    assert (out[~keep[:, 2], 2] == 0).all()


# ---- the fast torch mask (what the reference backend runs) is the definition, bit for bit ----

FAST_CASES = [  # (M, K, row0, col0): odd shapes, partial 32-groups, offsets past 2^31 and 2^32
    (1, 1, 0, 0), (3, 5, 0, 0), (7, 31, 0, 0), (2, 32, 0, 0), (5, 33, 0, 0), (17, 100, 0, 0),
    (130, 257, 0, 0), (64, 1376, 0, 0), (9, 70, 100, 30), (4, 64, 2 ** 31 - 2, 2 ** 31 - 40),
    (6, 75, 2 ** 32 - 6, 2 ** 32 - 80), (3, 48, 2 ** 31 // 4096 + 3, 17), (11, 40, 5, 2 ** 31 + 9)]
FAST_SEEDS = [0, 1, 17, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32 + 5, 2 ** 40 + 3, 2 ** 63 - 1]


def _fast(seed, p, m, k, row0=0, col0=0):
    return fast_keep_mask(seed, p, (m, k), row0=row0, col0=col0)


@pytest.mark.parametrize("seed", FAST_SEEDS)
@pytest.mark.parametrize("p", [2 ** -16, 0.05, 0.1, 0.5, 0.9, 1 - 2 ** -16])
def test_fast_mask_is_the_definition(seed, p):
    for m, k, row0, col0 in FAST_CASES:
        assert torch.equal(_fast(seed, p, m, k, row0, col0), _mask(seed, p, m, k, row0, col0)), \
            (m, k, row0, col0)


@pytest.mark.parametrize("chunk_pairs", [1, 16, 48, 1000])
def test_fast_mask_in_any_row_chunks(monkeypatch, chunk_pairs):
    """Chunks of one row, of rows not dividing M, several rows: the same bits, each chunk's
    rows where keep_mask_chunks says they are."""
    monkeypatch.setattr(dropout_module, "_CHUNK_PAIRS", chunk_pairs)
    for seed, (m, k, row0, col0) in zip(FAST_SEEDS, FAST_CASES[3:]):
        want = _mask(seed, 0.3, m, k, row0, col0)
        seen = torch.zeros(m, dtype=torch.bool)
        for rows, mask in keep_mask_chunks(seed, 0.3, (m, k), dtype=torch.float64, row0=row0,
                                           col0=col0):
            assert mask.dtype == torch.float64 and mask.shape == (rows.stop - rows.start, k)
            assert torch.equal(mask, want[rows].double())
            seen[rows] = True
        assert seen.all()


def test_fast_mask_random_cases():
    """A few hundred random shapes, seeds, rates and offsets (fixed generator)."""
    import random
    rng = random.Random(0)
    for _ in range(200):
        m, k = rng.randint(1, 70), rng.randint(1, 300)
        seed, p = rng.randrange(2 ** 63), rng.choice([0.01, 0.05, 0.25, 0.5, 0.75, 0.99])
        row0, col0 = rng.randrange(2 ** 32 - 70), rng.randrange(2 ** 32 - 300)
        assert torch.equal(_fast(seed, p, m, k, row0, col0), _mask(seed, p, m, k, row0, col0)), \
            (m, k, seed, p, row0, col0)


def test_fast_mask_edges_and_fallback(monkeypatch):
    # a rate that quantises to 0 keeps everything; empty shapes give empty masks
    assert _fast(3, 1e-7, 4, 40).all() and torch.equal(_fast(3, 1e-7, 4, 40), _mask(3, 1e-7, 4, 40))
    assert _fast(3, 0.5, 0, 40).shape == (0, 40) and _fast(3, 0.5, 4, 0).shape == (4, 0)
    assert dropout_module._fast_mask_ok()  # this torch's int32 arithmetic wraps mod 2^32
    # where it did not, the definition itself runs (same bits, slower)
    monkeypatch.setattr(dropout_module, "_FAST_OK", False)
    assert torch.equal(_fast(2 ** 33 + 1, 0.3, 37, 100, 2 ** 31, 7),
                       _mask(2 ** 33 + 1, 0.3, 37, 100, 2 ** 31, 7))


def test_reference_dropout_is_x_times_mask_times_scale():
    """reference._apply_dropout (the mask made chunk by chunk, scaled in the opmath dtype)
    gives exactly x * keep * keep_scale, in every dtype."""
    spec = DropoutSpec(0.2, 2 ** 35 + 7)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.randn(70, 129, generator=torch.Generator().manual_seed(2)).to(dtype)
        keep = _mask(spec.seed, spec.p, 70, 129)
        assert torch.equal(reference._apply_dropout(x, spec), x * keep * spec.keep_scale), dtype


# ---- the other backends: bit for bit ----

SHAPES = [(1, 1), (37, 100), (64, 64), (130, 257)]


@needs_triton
@pytest.mark.parametrize("seed", [0, 17, 2 ** 31 - 2, 2 ** 33 + 5])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_triton_mask_is_the_reference_mask(seed, p):
    for m, k in SHAPES:
        got = dropout_keep_mask(seed, quantised_p(p), (m, k), DEVICE).cpu()
        assert torch.equal(got, _mask(seed, p, m, k)), (m, k)


if triton is not None:
    @triton.jit
    def _tile_kernel(out_ptr, row0, col0, seed, p_drop, BLOCK: tl.constexpr):
        rows = row0 + tl.arange(0, BLOCK)
        cols_lo, cols_hi = pair_columns(col0, BLOCK // 2)
        keep_lo, keep_hi = keep_pairs(seed, rows, cols_lo, p_drop)
        at = out_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK - col0
        tl.store(at + cols_lo[None, :], keep_lo.to(tl.int8))
        tl.store(at + cols_hi[None, :], keep_hi.to(tl.int8))


@needs_triton
@pytest.mark.parametrize("block", [32, 64])
def test_triton_mask_tile_at_row_and_column_offsets(block):
    """The kernels' keep_pairs on a tile starting past 2^31 / K rows and at a far column, as a
    late tile of a tall, wide input, in the halves pair_columns gives."""
    row0, col0 = 2 ** 31 // 4096 + 3, 2 ** 31 - 64
    out = torch.empty((block, block), dtype=torch.int8, device=DEVICE)
    _tile_kernel[(1,)](out, row0, col0, 5, quantised_p(0.3), BLOCK=block)
    assert torch.equal(out.bool().cpu(), _mask(5, 0.3, block, block, row0=row0, col0=col0))


# ---- the seed comes from torch's RNG, so torch.manual_seed reproduces a run ----

def _layer_outputs(seed):
    from lowrank_fused import LowRankLinear
    torch.manual_seed(0)
    layer = LowRankLinear(16, 8, 4, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(32, 16)
    torch.manual_seed(seed)
    return layer(x), layer(x)


def test_low_rank_linear_dropout_follows_torch_manual_seed():
    first, second = _layer_outputs(1)
    assert not torch.equal(first, second), "two calls drew the same seed"
    again = _layer_outputs(1)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert not torch.equal(first, _layer_outputs(2)[0])


def test_peft_dropout_follows_torch_manual_seed():
    peft = pytest.importorskip("peft")
    import lowrank_fused.peft as lfp
    from torch import nn

    def outputs(seed):
        torch.manual_seed(0)
        model = peft.get_peft_model(nn.Sequential(nn.Linear(16, 24)),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                    lora_dropout=0.5))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        x = torch.randn(32, 16)
        model.train()
        torch.manual_seed(seed)
        with lfp.enable_fused(model):
            return model(x), model(x)

    first, second = outputs(1)
    assert not torch.equal(first, second)
    again = outputs(1)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])


@needs_triton
def test_triton_dropped_nan_gives_nan_like_the_reference():
    from lowrank_fused.triton_kernels import project
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] = float("nan")
    a = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    spec = DropoutSpec(0.5, 8)
    keep = reference.dropout_keep_mask(spec, x.shape, x.device)
    assert (~keep[:, 5]).any(), "no row drops the NaN column; pick another seed"
    _, want = reference.forward(x, torch.zeros(4, 64), None, a, torch.zeros(4, 3), 1.0, spec)
    got = project(x.to(DEVICE), a.to(DEVICE), spec.seed, spec.quantised_p).cpu()
    assert want.isnan().all() and got.isnan().all()
