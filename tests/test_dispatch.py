"""Backend choice: auto, explicit names, the environment override."""
import sys
import types

import pytest
import torch

from lowrank_fused import available_backends, dispatch


def test_auto_on_cpu_is_reference():
    assert dispatch.resolved_name("auto", torch.device("cpu")) == "reference"


def test_auto_on_cuda_prefers_gpu_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolved_name("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.resolved_name("auto", torch.device("cuda")) == "reference"
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(dispatch, "_load_cuda", lambda device: None)
    assert dispatch.resolved_name("auto", torch.device("cuda")) == "cuda"


def test_env_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("LOWRANK_FUSED_BACKEND", "triton")
    assert dispatch.resolved_name("auto", torch.device("cpu")) == "triton"  # interpreter is on
    assert dispatch.resolved_name("reference", torch.device("cpu")) == "reference"


def test_available_backends_follow_what_is_installed(monkeypatch):
    """Listed means usable: each listed backend loads here; hiding the triton package or the
    built extension (a None in sys.modules makes their import fail) removes it from the list."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: interpreter
    monkeypatch.setitem(sys.modules, "lowrank_fused._C", None)  # not built
    assert available_backends() == ["reference", "triton"]
    for name in available_backends():
        dispatch.resolve(name, device)
    monkeypatch.setitem(sys.modules, "triton", None)  # not installed
    assert available_backends() == ["reference"]
    monkeypatch.setitem(sys.modules, "lowrank_fused._C", types.ModuleType("lowrank_fused._C"))
    assert available_backends() == ["reference", "cuda"]  # built


def test_missing_triton_package(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(dispatch.BackendUnavailableError, match="pip install triton"):
        dispatch.resolved_name("triton", torch.device("cpu"))
