"""csrc/: every CUDA source compiles for sm_80 and sm_90a (no GPU needed), the bindings parse
against torch's headers, and on a GPU with the extension built the "cuda" backend matches the
reference backend."""
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ["80", "90a"]


def _with_local_includes(path: Path, seen=None) -> str:
    """A source's text followed by the csrc/ headers it includes (recursively)."""
    seen = set() if seen is None else seen
    seen.add(path)
    text = path.read_text()
    for name in re.findall(r'#include\s+"([^"]+)"', text):
        header = CSRC / name
        if header.exists() and header not in seen:
            text += "\n" + _with_local_includes(header, seen)
    return text


def test_compiled_sources_define_every_launcher_the_bindings_call():
    """The .cu files CI compiles (and setup.py builds) are the ones the extension needs: each
    launch_* function bindings.cpp calls has a definition in them."""
    called = set(re.findall(r"\b(launch_\w+)\s*\(", (CSRC / "bindings.cpp").read_text()))
    defined = set()
    for source in CU_FILES:
        defined |= set(re.findall(r"\bvoid\s+(launch_\w+)\s*\([^;{]*\)\s*\{",
                                  _with_local_includes(source)))
    assert called, "bindings.cpp calls no launch_* function: has its interface changed?"
    assert called <= defined, f"no definition in {[p.name for p in CU_FILES]} for " \
                              f"{sorted(called - defined)}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(source, arch, tmp_path):
    done = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-Werror", "all-warnings", "-c", str(source), "-o",
         str(tmp_path / "out.o"), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # ptxas -v: one "N bytes spill stores" per kernel; every kernel must keep its registers
    kernels = re.split(r"Compiling entry function '([^']+)'", done.stderr + done.stdout)
    spilling = [name for name, log in zip(kernels[1::2], kernels[2::2])
                if int(re.search(r"(\d+) bytes spill stores", log).group(1))]
    assert len(kernels) > 1 or "__global__" not in source.read_text(), "no ptxas -v report"
    assert not spilling, f"{source.name} for sm_{arch}: spills in {spilling}"


def _torch_includes():
    root = Path(torch.__file__).parent / "include"
    return [root, root / "torch" / "csrc" / "api" / "include"]


def _cuda_home():
    """The CUDA toolkit holding cuda_runtime.h (a CPU build of torch does not look for one)."""
    import os
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        candidates.append(str(Path(shutil.which("nvcc")).resolve().parents[1]))
    return next((c for c in candidates if c and (Path(c) / "include" / "cuda_runtime.h").exists()),
                None)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_home() is None,
                    reason="g++ or the CUDA toolkit is not installed")
def test_bindings_parse_against_torch_headers():
    includes = _torch_includes() + [Path(_cuda_home()) / "include",
                                    Path(sysconfig.get_paths()["include"])]
    done = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C"]
        + [f"-I{p}" for p in includes] + [str(CSRC / "bindings.cpp")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _extension_built():
    from lowrank_fused import dispatch
    return dispatch.cuda_extension_available()


@pytest.mark.skipif(not torch.cuda.is_available() or not _extension_built(),
                    reason="needs a GPU and the built extension lowrank_fused._C")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype,adapter_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16)])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("rank", [1, 12, 25, 64])
@pytest.mark.parametrize("m", [1, 37, 128, 1500])  # M = 1500: dA split over M
def test_cuda_backend_matches_reference(m, rank, p, dtype, adapter_dtype, deterministic):
    """Against the spec in float64 within the tolerance rule; the spec takes the mask of the
    project's definition, which is the kernels' mask bit for bit. Over a 16-bit base the kernels
    (tensor cores) multiply the low-rank operands in the base's dtype, so PyTorch's
    low-precision run of the same math is the reference with the adapters in the base dtype (as
    in test_triton.py)."""
    import dataclasses

    from helpers import case_spec_results, make_case
    from lowrank_fused import low_rank_linear
    from lowrank_fused.backends import cuda as cuda_backend
    from lowrank_fused.dropout import DropoutSpec, keep_mask
    from tolerance import assert_kernel_close

    case = make_case((m,), 100, 80, rank, trainable={"lora_a", "lora_b", "latent", "bias"},
                     latent=True, dtype=dtype, adapter_dtype=adapter_dtype, device="cuda")

    def adapters_in(dt):
        def cast(t):
            return t.detach().to(dt).requires_grad_(t.requires_grad)
        return dataclasses.replace(case, lora_a=cast(case.lora_a), lora_b=cast(case.lora_b),
                                   latent=cast(case.latent))

    results = {}
    for name, backend, c in (("reference", "reference", case), ("cuda", "cuda", case),
                             ("same math", "reference", adapters_in(dtype))):
        # cuBLAS only warns on a GPU without CUBLAS_WORKSPACE_CONFIG
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            y = low_rank_linear(c.x, c.weight, c.lora_a, c.lora_b, bias=c.bias, latent=c.latent,
                                scaling=c.scaling, dropout_p=p, dropout_seed=5, backend=backend)
            names = [n for n, t in c.tensors().items() if t.requires_grad]
            grads = torch.autograd.grad(y, [c.tensors()[n] for n in names], torch.ones_like(y))
        finally:
            torch.use_deterministic_algorithms(False)
        results[name] = dict(y=y, **dict(zip(names, grads)))
    ones = torch.ones(results["cuda"]["y"].shape, dtype=torch.float64, device="cuda")
    results["float64"] = case_spec_results(case, ones, p, seed=5)
    for name, torch_low in results["same math"].items():
        assert results["cuda"][name].dtype == results["reference"][name].dtype, name
        assert_kernel_close(results["cuda"][name], results["float64"][name], torch_low, name,
                            dtype)
    if p:
        got = cuda_backend.dropout_keep_mask(DropoutSpec(p, 5), (m, 100), "cuda").cpu()
        assert torch.equal(got, keep_mask(5, p, torch.arange(m), torch.arange(100)))
