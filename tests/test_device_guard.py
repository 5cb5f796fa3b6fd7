"""The Triton backend's device guard: Triton launches on the current CUDA device and stream, so
every launch must run with the tensors' device current (a second GPU shows it; here a spy on the
guard checks the device it gets and that every launcher runs inside it)."""
import contextlib

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed")

from helpers import make_case  # noqa: E402
from lowrank_fused.backends import _gpu_common  # noqa: E402
from lowrank_fused.backends import triton as triton_backend  # noqa: E402
from lowrank_fused.dropout import DropoutSpec  # noqa: E402
from lowrank_fused.triton_kernels import persistent  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHERS = ("project", "fused_linear", "grad_output_pass", "grad_input", "grad_a",
             "dropout_keep_mask")


@pytest.fixture
def guarded(monkeypatch):
    """Replaces the backend's guard by a spy: returns (devices the guard got, {launcher: the
    guarded device it ran under, None outside any guard})."""
    guards, active, ran = [], [None], {}

    @contextlib.contextmanager
    def spy(device):
        guards.append(torch.device(device))
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(triton_backend, "device_guard", spy)
    for name in LAUNCHERS:
        def launcher(*args, _name=name, _real=getattr(triton_backend.kernels, name), **kwargs):
            ran.setdefault(_name, []).append(active[-1])
            return _real(*args, **kwargs)
        monkeypatch.setattr(triton_backend.kernels, name, launcher)
    return guards, ran


def test_every_triton_launch_runs_under_the_tensors_device(guarded):
    guards, ran = guarded
    t = make_case((37,), 64, 48, 8, dtype=torch.float32, device=DEVICE)
    dropout = DropoutSpec(0.25, seed=3)
    x, w, b, a, lb = (v.detach() for v in (t.x, t.weight, t.bias, t.lora_a, t.lora_b))
    y, p = triton_backend.forward(x, w, b, a, lb, t.scaling, dropout)
    triton_backend.backward(torch.ones_like(y), x, p, w, a, lb, t.scaling, dropout,
                            need_x=True, need_a=True, need_b=True, need_bias=True)
    triton_backend.dropout_keep_mask(dropout, (4, 32), x.device)
    assert guards == [x.device] * 3  # forward, backward, keep-mask
    assert set(ran) == set(LAUNCHERS)
    assert all(devices == [x.device] * len(devices) for devices in ran.values()), ran


def test_device_guard_makes_a_cuda_device_current():
    guard = _gpu_common.device_guard(torch.device("cuda", 1))  # built, not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_gpu_common.device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(_gpu_common.device_guard(torch.device("meta")), contextlib.nullcontext)


def test_persistent_scratch_goes_to_the_current_device(monkeypatch):
    # Triton's allocator gets no device: the scratch must go where the launch runs (the guarded,
    # current device), not to device="cuda" (torch's current device, unguarded).
    asked = []

    def empty(size, dtype, device):
        asked.append(torch.device(device))
        return torch.zeros(size, dtype=dtype)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(persistent.torch, "empty", empty)
    persistent._torch_scratch(256, 128, None)
    assert asked == [torch.device("cuda", 1)]
    monkeypatch.undo()
    assert persistent.scratch_buffer(64, torch.device("cpu")).device == torch.device("cpu")
