"""The measured per-shape policy behind "auto" on CUDA tensors (lowrank_fused.policy), and its
builder (tools/auto_policy.py), on synthetic measurements."""
import json
from types import SimpleNamespace

import pytest
import torch

from lowrank_fused import dispatch, policy, stats
from lowrank_fused.functional import call_kind, low_rank_linear


def _entry(m, n, k, r, winner, method="lora", mode="forward+backward", arch="sm90",
           dtype="bfloat16"):
    return dict(arch=arch, dtype=dtype, method=method, mode=mode, m=m, n=n, k=k, r=r,
                winner=winner)


@pytest.fixture
def use_policy(tmp_path, monkeypatch):
    def write(entries):
        path = tmp_path / "policy.json"
        path.write_text(json.dumps({"entries": entries}))
        monkeypatch.setenv(policy.ENV_VAR, str(path))
        policy._load.cache_clear()
        return path
    yield write
    policy._load.cache_clear()


def test_packaged_policy_is_what_the_builder_writes(monkeypatch):
    """The shipped file is the builder's output (its `about` has one source,
    tools/auto_policy.py), is the policy in force by default, and each entry wins at its own
    shape; while it is empty, no call has a measured choice ("auto" keeps Triton)."""
    from tools import auto_policy

    monkeypatch.delenv(policy.ENV_VAR, raising=False)
    policy._load.cache_clear()
    data = json.loads(policy.DEFAULT_PATH.read_text())
    assert policy.DEFAULT_PATH.read_text() == auto_policy.policy_text(
        data["entries"], data["source"], data["devices"])
    assert list(policy.entries()) == data["entries"]
    for e in data["entries"]:
        at = (e["arch"], e["dtype"], e["method"], e["mode"], e["m"], e["n"], e["k"], e["r"])
        assert policy.choose(*at) == e["winner"], e
    if not data["entries"]:
        assert policy.choose("sm90", "bfloat16", "lora", "forward+backward", 8192, 4096, 4096,
                             16) is None


def test_nearest_measured_shape_wins(use_policy):
    use_policy([_entry(8192, 4096, 4096, 16, "cuda"), _entry(8192, 4096, 4096, 64, "triton"),
                _entry(2048, 1024, 1024, 16, "triton")])
    choose = policy.choose
    assert choose("sm90", "bfloat16", "lora", "forward+backward", 8192, 4096, 4096, 16) == "cuda"
    assert choose("sm90", "bfloat16", "lora", "forward+backward", 8192, 4096, 4096, 48) == "triton"
    assert choose("sm90", "bfloat16", "lora", "forward+backward", 6000, 4096, 4096, 12) == "cuda"
    assert choose("sm90", "bfloat16", "lora", "forward+backward", 2048, 1024, 1024, 8) == "triton"
    # M unknown (dynamic shapes): decided on N, K, r alone
    assert choose("sm90", "bfloat16", "lora", "forward+backward", None, 4096, 4096, 16) == "cuda"


def test_no_entry_for_arch_dtype_or_mode_means_no_choice(use_policy):
    use_policy([_entry(8192, 4096, 4096, 16, "cuda")])
    args = (8192, 4096, 4096, 16)
    assert policy.choose("sm80", "bfloat16", "lora", "forward+backward", *args) is None
    assert policy.choose("sm90", "float16", "lora", "forward+backward", *args) is None
    assert policy.choose("sm90", "bfloat16", "lora", "forward", *args) is None


def test_own_method_preferred_then_any(use_policy):
    use_policy([_entry(8192, 4096, 4096, 16, "cuda", method="lora_fa"),
                _entry(8192, 4096, 4096, 16, "triton", method="lora")])
    at = ("sm90", "bfloat16")
    assert policy.choose(*at, "lora_fa", "forward+backward", 8192, 4096, 4096, 16) == "cuda"
    assert policy.choose(*at, "lora", "forward+backward", 8192, 4096, 4096, 16) == "triton"
    use_policy([_entry(8192, 4096, 4096, 16, "cuda", method="lora_fa")])
    assert policy.choose(*at, "lora_xs", "forward+backward", 8192, 4096, 4096, 16) == "cuda"


@pytest.mark.parametrize("broken,message", [
    ("not json", "cannot read"),
    (json.dumps({"cases": []}), "'entries' list"),
    (json.dumps({"entries": [{"m": 1}]}), "needs 'arch'"),
    (json.dumps({"entries": [_entry(1, 1, 1, 1, "cublas")]}), "winner must be one of"),
    (json.dumps({"entries": [_entry(0, 1, 1, 1, "cuda")]}), "dimension < 1"),
])
def test_broken_policy_file_says_what_is_wrong(tmp_path, monkeypatch, broken, message):
    path = tmp_path / "policy.json"
    path.write_text(broken)
    monkeypatch.setenv(policy.ENV_VAR, str(path))
    policy._load.cache_clear()
    try:
        with pytest.raises(ValueError, match=message):
            policy.entries()
    finally:
        policy._load.cache_clear()


def _stand_ins(monkeypatch):
    """Both GPU backends "built", as stand-in modules (select returns them by name)."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(dispatch, "_load_triton", lambda device: SimpleNamespace(NAME="triton"))
    monkeypatch.setattr(dispatch, "_load_cuda", lambda device: SimpleNamespace(NAME="cuda"))


@pytest.fixture
def both_gpu_backends(monkeypatch):
    _stand_ins(monkeypatch)
    monkeypatch.setattr(dispatch, "gpu_arch", lambda device: "sm90")


def test_auto_defers_to_the_policy_per_shape_on_cuda(use_policy, both_gpu_backends):
    use_policy([_entry(8192, 4096, 4096, 16, "cuda"), _entry(8192, 4096, 4096, 64, "triton")])
    cuda = torch.device("cuda")

    def choose(backend, dtype, shape, kind="lora_fa:forward+backward"):
        return dispatch.select(backend, cuda, dtype=dtype, shape=shape, kind=kind).NAME

    assert choose("auto", torch.bfloat16, (8192, 4096, 4096, 16)) == "cuda"
    assert choose("auto", torch.bfloat16, (8192, 4096, 4096, 64)) == "triton"
    assert choose("triton", torch.bfloat16, (8192, 4096, 4096, 16), "lora:forward") == "triton"
    # nothing measured for this dtype or mode: Triton
    assert choose("auto", torch.float16, (8192, 4096, 4096, 16)) == "triton"
    assert choose("auto", torch.bfloat16, (8192, 4096, 4096, 16), "lora:forward") == "triton"


def test_ops_choose_with_their_own_shapes(use_policy, monkeypatch):
    """The custom ops choose the backend with the shapes they run on (here on the CPU, taken as
    a GPU, with both GPU backends standing in as the PyTorch backend)."""
    from lowrank_fused import ops
    from lowrank_fused.backends import pytorch as reference

    use_policy([_entry(37, 20, 30, 4, "cuda", dtype="float32", mode="forward"),
                _entry(37, 20, 30, 64, "triton", dtype="float32", mode="forward")])
    loaded = []

    def stand_in(name):
        return lambda device: loaded.append(name) or reference
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(dispatch, "_load_cuda", stand_in("cuda"))
    monkeypatch.setattr(dispatch, "_load_triton", stand_in("triton"))
    monkeypatch.setattr(dispatch, "_on_gpu", lambda device: True)
    monkeypatch.setattr(dispatch, "gpu_arch", lambda device: "sm90")
    seed = torch.zeros(1, dtype=torch.int64)
    for r, want in [(4, "cuda"), (60, "triton")]:
        loaded.clear()
        x, w, a, b = torch.randn(37, 30), torch.randn(20, 30), torch.randn(r, 30), torch.randn(20, r)
        y, p, *_ = ops.forward_op(x, w, None, a, b, None, 0.5, 0.0, seed, "auto",
                                  kind="lora:forward")
        torch.testing.assert_close(y, x @ w.T + 0.5 * (x @ a.T) @ b.T)
        assert loaded == [want]


def test_without_both_gpu_backends_auto_is_concrete(monkeypatch):
    _stand_ins(monkeypatch)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    assert dispatch.select("auto", torch.device("cuda"), kind="lora:forward").NAME == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: True)
    assert dispatch.select("auto", torch.device("cuda"), kind="lora:forward").NAME == "cuda"


def test_call_kind_describes_method_and_mode():
    k, n, r = 12, 10, 3
    x = torch.randn(2, 5, k)
    w, a, b, lat = torch.randn(n, k), torch.randn(r, k), torch.randn(n, r), torch.randn(r, r)
    kind = call_kind
    assert kind(x, w, a, b, None) == "lora:forward"
    assert kind(x, w, a.requires_grad_(), b, None) == "lora:forward+backward"
    assert kind(x, w, a.detach(), b.requires_grad_(), None) == "lora_fa:forward+backward"
    assert kind(x, w, a.detach(), b.detach(), lat.requires_grad_()) == "lora_xs:forward+backward"
    with torch.no_grad():
        assert kind(x, w, a.requires_grad_(), b, None) == "lora:forward"


@pytest.mark.parametrize("dynamic", [False, True, None])
def test_choice_traces_under_compile_without_graph_breaks(dynamic):
    """The choice is made inside the ops at run time: a compiled "auto" call traces whole, over
    new M's too, and runs the reference backend on CPU tensors."""
    name = f"traced-{dynamic}"

    def f(x, w, a, b):
        return low_rank_linear(x, w, a, b, backend="auto", name=name)

    torch._dynamo.reset()
    stats.reset([name])
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for m in (7, 9, 11):  # new M: automatic dynamic shapes recompile with a symbolic M
        x, w, a, b = torch.randn(m, 12), torch.randn(10, 12), torch.randn(3, 12), torch.randn(10, 3)
        torch.testing.assert_close(compiled(x, w, a, b), x @ w.T + (x @ a.T) @ b.T)
    assert stats.snapshot()[name] == {"reference": {"forward": 3}}


def test_builder_names_the_faster_backend_per_measured_case(tmp_path, use_policy):
    from tools import auto_policy

    def case(impl, ms, r, mode="forward+backward"):
        return {"extra_info": dict(shape="s", K=4096, N=4096, M=8192, rank=r, impl=impl,
                                   method="lora_fa", mode=mode, dtype="torch.bfloat16",
                                   median_ms=ms, device="NVIDIA H100", arch="sm90")}
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        case("triton", 1.0, 16), case("cuda", 0.9, 16),
        case("triton", 1.0, 64), case("cuda", 1.2, 64),
        case("triton", 1.0, 8),  # no cuda timing: no entry
        case("peft", 0.5, 16), case("linear", 0.8, 16),  # not contenders for the policy
    ]}))
    out = tmp_path / "policy.json"
    auto_policy.main([str(results), "--out", str(out)])
    written = json.loads(out.read_text())
    assert [(e["r"], e["winner"]) for e in written["entries"]] == [(16, "cuda"), (64, "triton")]
    assert written["entries"][0]["median_ms"] == {"cuda": 0.9, "triton": 1.0}
    assert written["devices"] == ["NVIDIA H100"]
    use_policy(written["entries"])
    assert policy.choose("sm90", "bfloat16", "lora_fa", "forward+backward", 8192, 4096, 4096,
                         16) == "cuda"


def test_call_kind_parses_and_rejects_other_strings():
    assert dispatch.parse_kind("lora_xs:forward") == ("lora_xs", "forward")
    for bad in ("lora", "auto:lora:forward", "lora:"):
        with pytest.raises(ValueError, match="call kind"):
            dispatch.parse_kind(bad)
