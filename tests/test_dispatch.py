"""Backend choice: auto, explicit names, the environment override."""
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


def test_available_backends_lists_reference_and_triton():
    names = available_backends()
    assert names[0] == "reference"
    assert ("triton" in names) == (dispatch.triton_available())


def test_missing_triton_package(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(dispatch.BackendUnavailableError, match="pip install triton"):
        dispatch.resolved_name("triton", torch.device("cpu"))
