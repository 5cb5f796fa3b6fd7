"""Build script. The Python package always installs; the CUDA extension lowrank_fused._C is built
from csrc/ only when a CUDA toolkit and a CUDA build of torch are present.

LOWRANK_FUSED_BUILD_CUDA=1 forces the extension (fails loudly if it cannot be built),
LOWRANK_FUSED_BUILD_CUDA=0 skips it; unset means "build it when possible". Building it needs
torch at build time: pip install -e . --no-build-isolation.
"""
import glob
import os

from setuptools import setup

PACKAGES = ["lowrank_fused", "lowrank_fused.backends", "lowrank_fused.peft",
            "lowrank_fused.triton_kernels"]
# triton_kernels/ installs as lowrank_fused.triton_kernels: a top-level `triton_kernels` is taken.
PACKAGE_DIR = {"lowrank_fused.triton_kernels": "triton_kernels"}


def cuda_extension():
    """([extension], cmdclass) for lowrank_fused._C, or ([], {}) when it is not to be built."""
    wanted = os.environ.get("LOWRANK_FUSED_BUILD_CUDA", "auto").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        return [], {}
    force = wanted in ("1", "true", "yes", "on")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        if force:
            raise RuntimeError("LOWRANK_FUSED_BUILD_CUDA=1 needs torch at build time: "
                               "pip install -e . --no-build-isolation") from err
        return [], {}
    missing = [why for ok, why in [
        (bool(sources), "no sources in csrc/"),
        (CUDA_HOME is not None, "no CUDA toolkit (CUDA_HOME / nvcc)"),
        (torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build"),
    ] if not ok]
    if missing:
        if force:
            raise RuntimeError("cannot build lowrank_fused._C: " + "; ".join(missing))
        return [], {}
    arch_flags = os.environ.get("LOWRANK_FUSED_CUDA_ARCHS", "80;90a").split(";")
    nvcc = ["-O3", "--use_fast_math"] + [
        f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_flags if a]
    ext = CUDAExtension("lowrank_fused._C", sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
