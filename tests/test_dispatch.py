"""Backend choice: auto, explicit names, the environment override."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from lowrank_fused import available_backends, dispatch, low_rank_linear, stats


def chosen(backend, device):
    """The name of the backend ``dispatch.select`` picks for a plain dense call."""
    return dispatch.select(backend, torch.device(device)).NAME


def test_auto_on_cpu_is_reference():
    assert chosen("auto", "cpu") == "reference"


def test_auto_on_cuda_prefers_gpu_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert chosen("auto", "cuda") == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert chosen("auto", "cuda") == "reference"
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(dispatch, "_load_cuda", lambda device: SimpleNamespace(NAME="cuda"))
    assert chosen("auto", "cuda") == "cuda"


def test_env_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("LOWRANK_FUSED_BACKEND", "triton")
    assert chosen("auto", "cpu") == "triton"  # interpreter is on
    assert chosen("reference", "cpu") == "reference"


def test_available_backends_follow_what_is_installed(monkeypatch):
    """Listed means usable: each listed backend loads here; hiding the triton package or the
    built extension (a None in sys.modules makes their import fail) removes it from the list."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: interpreter
    lookups = (dispatch.triton_available, dispatch._extension_load_error)  # cached per process

    def hide(name, module):
        monkeypatch.setitem(sys.modules, name, module)
        for lookup in lookups:
            lookup.cache_clear()

    try:
        hide("lowrank_fused._C", None)  # not built
        assert available_backends() == ["reference", "triton"]
        for name in available_backends():
            dispatch.select(name, device)
        hide("triton", None)  # not installed
        assert available_backends() == ["reference"]
        hide("lowrank_fused._C", types.ModuleType("lowrank_fused._C"))
        assert available_backends() == ["reference", "cuda"]  # built
    finally:
        monkeypatch.undo()
        for lookup in lookups:
            lookup.cache_clear()


def test_missing_triton_package(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(dispatch.BackendUnavailableError, match="pip install triton"):
        dispatch.select("triton", torch.device("cpu"))


def test_extension_load_failure_keeps_its_cause_and_both_torch_versions(monkeypatch):
    """A built extension that fails to load (e.g. an ABI mismatch after a torch upgrade) must
    not read as "not built": the error keeps the ImportError and names both torch versions."""
    import importlib.util
    import sys
    import types

    cause = "ImportError: undefined symbol: _ZN3c104cuda9SetDevice"
    monkeypatch.setattr(dispatch, "_extension_load_error", lambda: cause)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        object() if name == "lowrank_fused._C" else real_find_spec(name, *a)))
    monkeypatch.setitem(sys.modules, "lowrank_fused._build_info",
                        types.SimpleNamespace(TORCH_VERSION="2.9.0+cu128"))
    assert not dispatch.cuda_extension_available()
    with pytest.raises(dispatch.BackendUnavailableError) as info:
        dispatch.select("cuda", torch.device("cuda"))
    message = str(info.value)
    assert cause in message and "2.9.0+cu128" in message and torch.__version__ in message
    assert "not built" not in message


def test_missing_extension_says_not_built(monkeypatch):
    monkeypatch.setattr(dispatch, "_extension_load_error", lambda: "ModuleNotFoundError: _C")
    with pytest.raises(dispatch.BackendUnavailableError, match="not built"):
        dispatch.select("cuda", torch.device("cuda"))


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
