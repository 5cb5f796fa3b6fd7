"""Odd arguments get an error naming the argument, what was expected and what came (issue 14,
items 11 and 12)."""
import numpy
import warnings

import pytest
import torch

from lowrank_fused import BackendUnavailableError, low_rank_linear

K, N, R = 8, 6, 2


_G = torch.Generator().manual_seed(0)
WEIGHT, LORA_A, LORA_B = (torch.randn(*s, generator=_G) for s in ((N, K), (R, K), (N, R)))


def call(x=None, **kwargs):
    x = torch.randn(5, K) if x is None else x
    return low_rank_linear(x, WEIGHT, LORA_A, LORA_B, backend="reference", **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_p=None), TypeError, r"dropout_p must be a float in \[0, 1\), got NoneType None"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float in \[0, 1\), got str '0.1'"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p: the dropout probability must be in \[0, 1\), got nan"),
    (dict(scaling="abc"), TypeError, r"scaling must be a real number .*got str 'abc'"),
    (dict(scaling=None), TypeError, r"scaling must be a real number .*got NoneType None"),
    (dict(scaling=float("nan")), ValueError, r"scaling must be finite, got nan"),
    (dict(scaling=float("-inf")), ValueError, r"scaling must be finite, got -inf"),
    (dict(scaling=torch.tensor(float("inf"))), ValueError, r"scaling must be finite, got inf"),
    (dict(scaling=torch.tensor(2.0, requires_grad=True)), ValueError, r"scaling must not require grad"),
    (dict(scaling=torch.ones(2)), ValueError, r"scaling must be a number or a 1-element tensor, got a tensor of shape \(2,\)"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError, r"dropout_seed must be None or an int in \[0, 2\*\*63\), got float 1.5"),
    (dict(dropout_p=0.1, dropout_seed=3.0), TypeError, r"dropout_seed must be None or an int .*got float 3.0"),
    (dict(dropout_p=0.1, dropout_seed="7"), TypeError, r"dropout_seed must be None or an int .*got str '7'"),
    (dict(dropout_p=0.1, dropout_seed=object()), TypeError, r"dropout_seed must be None or an int .*got object"),
    (dict(dropout_p=0.1, dropout_seed=2**63), ValueError, r"dropout_seed must be an int in \[0, 2\*\*63\).*got 9223372036854775808"),
    (dict(dropout_p=0.1, dropout_seed=-1), ValueError, r"dropout_seed must be an int in \[0, 2\*\*63\).*got -1"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_good_odd_arguments_still_work():
    x = torch.randn(5, K)
    base = call(x, scaling=2.0, dropout_p=0.25, dropout_seed=2**63 - 1)
    torch.testing.assert_close(call(x, scaling=torch.tensor(2.0), dropout_p=0.25,
                                    dropout_seed=numpy.int64(2**63 - 1)), base)
    call(x, scaling=numpy.float32(0.5), dropout_p=0)


def test_numpy_array_as_x():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got numpy.ndarray "
                                        r"\(convert it with torch.from_numpy"):
        call(numpy.ones((5, K), dtype=numpy.float32))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got builtins.list"):
        call([[1.0] * K])


def test_tuning_table_not_utf8_costs_one_warning_never_a_call(tmp_path, monkeypatch):
    """The shipped tuning table (which replaced the measured policy file) is data: bytes that
    are not UTF-8 are named in one warning and the table is ignored (its keys are timed)."""
    from lowrank_fused.tuning import TuningCacheWarning, environment, shipped
    path = tmp_path / "table.json"
    path.write_bytes(b'{"schema": "lowrank_fused.tuning-table/1", "note": "\xff\xfe caf\xe9"}')
    monkeypatch.setenv(shipped.TABLE_ENV, str(path))
    table = shipped.ShippedTable(shipped.table_path())
    env = environment.current()
    with pytest.warns(TuningCacheWarning, match=rf"shipped tuning table {path} "
                                                r"\(LOWRANK_FUSED_TUNING_TABLE\): .* is not valid "
                                                r"JSON \(UnicodeDecodeError"):
        assert table.winner(env, "any") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.kernel(env, "any") is None  # read once: no second warning


def test_the_removed_policy_variable_warns_once_and_is_not_read(monkeypatch):
    from lowrank_fused.tuning import TuningCacheWarning, shipped
    monkeypatch.setattr(shipped, "_warned_removed", False)
    monkeypatch.setenv("LOWRANK_FUSED_POLICY", "/no/such/policy.json")
    monkeypatch.delenv(shipped.TABLE_ENV, raising=False)
    with pytest.warns(TuningCacheWarning, match="LOWRANK_FUSED_POLICY is no longer read.*"
                                                "LOWRANK_FUSED_TUNING_TABLE"):
        assert shipped.table_path() == shipped.DEFAULT_PATH
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped.table_path()


def test_numpy_too_new_for_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    with pytest.raises(BackendUnavailableError,
                       match=r"needs numpy < 2\.4, got numpy 2\.4\.0.*pip install 'numpy<2\.4'"):
        low_rank_linear(torch.randn(3, K), torch.randn(N, K), torch.randn(R, K),
                        torch.randn(N, R), backend="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")  # the check passes; the call runs
    low_rank_linear(torch.randn(3, K), torch.randn(N, K), torch.randn(R, K), torch.randn(N, R),
                    backend="triton")
