"""tests/pairwise.py: the cover the kernel tests run on instead of the full product."""
import itertools

import pairwise

FACTORS = dict(m=[1, 37, 128], rank=[1, 12, 25, 64], method=["lora", "lora_fa", "lora_xs"],
               bias=[True, False], p=[0.0, 0.2], dtype=["fp32", "bf16", "fp16"])


def test_every_pair_of_levels_is_covered(monkeypatch):
    monkeypatch.delenv(pairwise.ENV, raising=False)
    rows = pairwise.cases(FACTORS)
    names = list(FACTORS)
    for i, j in itertools.combinations(range(len(names)), 2):
        wanted = set(itertools.product(FACTORS[names[i]], FACTORS[names[j]]))
        assert wanted <= {(row[i], row[j]) for row in rows}, (names[i], names[j])
    full = len(list(itertools.product(*FACTORS.values())))
    assert len(rows) <= 16 < full  # 4 x 3 = 12 at the least
    assert rows == pairwise.cases(FACTORS)  # the same list every run


def test_the_exhaustive_run_is_the_full_product(monkeypatch):
    monkeypatch.setenv(pairwise.ENV, "1")
    assert pairwise.cases(FACTORS) == list(itertools.product(*FACTORS.values()))
