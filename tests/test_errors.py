"""Bad input raises a clear, documented error naming what was expected and what came."""
import pytest
import torch
from torch import nn

from lowrank_fused import BackendUnavailableError, LowRankLinear, apply_low_rank, low_rank_linear
from lowrank_fused.backends import pytorch as reference

K, N, R = 8, 6, 2


def tensors(**over):
    t = dict(x=torch.randn(5, K), weight=torch.randn(N, K), lora_a=torch.randn(R, K),
             lora_b=torch.randn(N, R))
    t.update(over)
    return t


def call(**over):
    t = tensors(**over)
    extra = {k: t.pop(k) for k in list(t) if k not in ("x", "weight", "lora_a", "lora_b")}
    return low_rank_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], **extra)


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.randn(5, K + 1)), r"x must have shape \(\.\.\., K\) with K = weight.shape\[1\] = 8, got \(5, 9\)"),
    (dict(lora_a=torch.randn(R, K + 2)), r"lora_a must have shape \(r, K\) with K = 8, got \(2, 10\)"),
    (dict(lora_b=torch.randn(N + 1, R)), r"lora_b must have shape \(6, 2\).*got \(7, 2\)"),
    (dict(lora_b=torch.randn(N, R + 1)), r"lora_b must have shape \(6, 2\).*got \(6, 3\)"),
    (dict(latent=torch.randn(R, R + 1)), r"latent must have shape \(2, 2\).*got \(2, 3\)"),
    (dict(bias=torch.randn(N + 2)), r"bias must have shape \(6,\).*got \(8,\)"),
    (dict(weight=torch.randn(N, K, 1)), r"weight must be 2-D"),
    (dict(lora_a=torch.randn(0, K), lora_b=torch.randn(N, 0)), r"rank r = lora_a.shape\[0\] must be at least 1, got 0"),
    (dict(x=torch.randn(5, 0), weight=torch.randn(N, 0), lora_a=torch.randn(R, 0)), r"in_features K = weight.shape\[1\] must be at least 1, got weight of shape \(6, 0\)"),
    (dict(dropout_p=1.0), r"dropout_p: the dropout probability must be in \[0, 1\), got 1.0"),
    (dict(backend="cudnn"), r"unknown backend 'cudnn': expected one of auto, reference, triton, cuda"),
])
def test_value_errors(over, match):
    with pytest.raises(ValueError, match=match):
        call(**over)


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.ones(5, K, dtype=torch.int64)), r"x must have a floating-point dtype.*got torch.int64"),
    (dict(lora_b=torch.ones(N, R, dtype=torch.int32)), r"lora_b must have a floating-point dtype.*got torch.int32"),
    (dict(x=torch.randn(5, K, dtype=torch.float64)), r"x and weight must share a dtype.*float64.*float32"),
    (dict(lora_b=torch.randn(N, R, dtype=torch.float16)), r"adapter tensors must share one dtype: lora_a is torch.float32, lora_b is torch.float16"),
    (dict(bias=torch.randn(N, dtype=torch.float64)), r"bias must have weight's dtype torch.float32, got torch.float64"),
])
def test_type_errors(over, match):
    with pytest.raises(TypeError, match=match):
        call(**over)


def test_mixed_devices():
    with pytest.raises(ValueError, match=r"all tensors must be on one device.*lora_a on meta"):
        call(lora_a=torch.randn(R, K, device="meta"))


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("LOWRANK_FUSED_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'.*LOWRANK_FUSED_BACKEND"):
        call()
    monkeypatch.setenv("LOWRANK_FUSED_BACKEND", "reference")
    call()  # the env only replaces "auto"; explicit choices still win
    call(backend="reference")


def test_cuda_backend_unavailable_says_how_to_build():
    with pytest.raises(BackendUnavailableError, match="LOWRANK_FUSED_BUILD_CUDA=1"):
        call(backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        call(backend="triton")


@pytest.mark.parametrize("rank", [0, -1, 7])
def test_layer_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=rf"rank must be between 1 and min\(out_features, in_features\) = 6, got {rank}"):
        LowRankLinear(K, N, rank)
    with pytest.raises(ValueError, match="rank must be between"):
        LowRankLinear.from_linear(nn.Linear(K, N), rank)


def test_layer_unknown_method_and_bad_dropout():
    with pytest.raises(ValueError, match=r"unknown method 'dora': expected one of lora, lora_fa, lora_xs"):
        LowRankLinear(K, N, 2, method="dora")
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.5"):
        LowRankLinear(K, N, 2, dropout=1.5)
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear, got Conv1d"):
        LowRankLinear.from_linear(nn.Conv1d(2, 2, 1), 1)


def test_layer_wrong_input_width():
    layer = LowRankLinear(K, N, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K\) with K = weight.shape\[1\] = 8, got \(3, 4\)"):
        layer(torch.randn(3, 4))


def test_apply_low_rank_no_match():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no nn.Linear of the model matches target_modules=\['q_proj'\]"):
        apply_low_rank(model, ["q_proj"], 2)


def test_reference_mask_depends_only_on_seed():
    from lowrank_fused.dropout import DropoutSpec
    a = reference.dropout_keep_mask(DropoutSpec(0.5, 9), (4, 4), torch.device("cpu"))
    torch.rand(3)
    b = reference.dropout_keep_mask(DropoutSpec(0.5, 9), (4, 4), torch.device("cpu"))
    assert torch.equal(a, b)
