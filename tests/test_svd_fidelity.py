"""LoRA-XS's randomized SVD (large matrices on the CPU) is at least as accurate as the paper's
sklearn call, randomized_svd(n_iter=10, n_oversamples=10) (issue 14, item 9)."""
import pytest
import torch

from lowrank_fused import truncated_svd
from lowrank_fused.initialization import EXACT_SVD_MAX_DIM

SIZE, RANK = 1100, 32  # above EXACT_SVD_MAX_DIM: the randomized path


def captured(u, w, s_exact):
    """Energy of W captured by span(U_r), over the optimal (the top-r exact σ²)."""
    u = u.double()
    return ((u.T @ w.double()).square().sum() / s_exact[:RANK].square().sum()).item()


@pytest.fixture(scope="module")
def gaussian():
    # a flat spectrum (like an untrained weight) is the hard case for a randomized SVD
    w = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return w, torch.linalg.svdvals(w.double())


def test_randomized_svd_captures_the_optimal_energy(gaussian):
    assert SIZE > EXACT_SVD_MAX_DIM
    w, s_exact = gaussian
    u, s, vh = truncated_svd(w, RANK, generator=torch.Generator().manual_seed(1))
    energy = captured(u, w, s_exact)
    sigma_error = ((s.double() - s_exact[:RANK]).abs() / s_exact[:RANK]).max().item()
    # measured 0.9964 and 0.49 %; sklearn with n_iter=10 gets 0.9865 and 1.75 % here
    assert energy >= 0.99, energy
    assert sigma_error <= 0.01, sigma_error


def test_at_least_as_accurate_as_sklearn(gaussian):
    extmath = pytest.importorskip("sklearn.utils.extmath")
    w, s_exact = gaussian
    u_paper, _, _ = extmath.randomized_svd(w.double().numpy(), RANK, n_oversamples=10,
                                           n_iter=10, random_state=0)
    paper = captured(torch.from_numpy(u_paper), w, s_exact)
    ours = captured(truncated_svd(w, RANK, generator=torch.Generator().manual_seed(1))[0],
                       w, s_exact)
    assert ours >= paper, (ours, paper)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_exact_on_gpu(gaussian):
    w, s_exact = gaussian
    _, s, _ = truncated_svd(w.cuda(), RANK)
    torch.testing.assert_close(s.cpu().double(), s_exact[:RANK], rtol=1e-4, atol=0)
