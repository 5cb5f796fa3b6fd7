"""Initialisation: PEFT's kaiming-uniform A, LoRA-XS from the truncated SVD and its ablations."""
import math

import pytest
import torch

from lowrank_fused import kaiming_uniform_a_, lora_xs_factors, truncated_svd
from lowrank_fused.initialization import EXACT_SVD_MAX_DIM


def low_rank_matrix(n, k, decay=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, min(n, k), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, min(n, k), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(n, k), dtype=torch.float64)
    return (u * s) @ v.T, s


def test_kaiming_bound():
    a = kaiming_uniform_a_(torch.empty(64, 400))
    assert a.abs().max() <= 1 / math.sqrt(400) and a.abs().max() > 0.9 / math.sqrt(400)


@pytest.mark.parametrize("n, k", [(40, 30), (EXACT_SVD_MAX_DIM + 100, EXACT_SVD_MAX_DIM + 50)])
def test_top_triplets_exact_and_randomized(n, k):
    w, s_true = low_rank_matrix(n, k)
    u, s, vh = truncated_svd(w, 8)
    torch.testing.assert_close(s, s_true[:8], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=u.dtype), rtol=0, atol=1e-8)
    best = (u * s) @ vh
    assert torch.linalg.matrix_norm(w - best, ord=2) <= s_true[8] * (1 + 1e-6)


def test_bottom_triplets_and_sigma_options():
    w, s_true = low_rank_matrix(20, 16)
    _, s_bottom, _ = truncated_svd(w, 3, triplets="bottom")
    torch.testing.assert_close(s_bottom, s_true[-3:])
    a_sigma, b = lora_xs_factors(w, 4)
    a_plain, b2 = lora_xs_factors(w, 4, fold_sigma=False)
    torch.testing.assert_close(a_sigma, a_plain * s_true[:4, None])
    torch.testing.assert_close(b, b2)


@pytest.mark.parametrize("source", ["random_svd", "random"])
def test_random_ablations_do_not_follow_w(source):
    w, _ = low_rank_matrix(20, 16)
    a, b = lora_xs_factors(w, 4, source=source, generator=torch.Generator().manual_seed(1))
    a_w, b_w = lora_xs_factors(w, 4)
    assert a.shape == a_w.shape and b.shape == b_w.shape
    assert torch.linalg.matrix_norm(b @ a - b_w @ a_w) > 0.1


def test_unknown_init_options():
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match="source must be one of"):
        lora_xs_factors(w, 2, source="pca")
    with pytest.raises(ValueError, match="triplets must be one of"):
        lora_xs_factors(w, 2, triplets="middle")
