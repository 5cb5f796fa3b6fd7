"""A tree used as it is, never installed (how a GPU machine gets it), imports its own kernels."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_uninstalled_copy_imports_its_own_kernels(tmp_path):
    for folder in ("lowrank_fused", "triton_kernels"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    code = ("import lowrank_fused, lowrank_fused.triton_kernels.forward as f; "
            "print(lowrank_fused.__file__); print(f.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    # An installed lowrank_fused (editable or not) must not hand the copy someone else's kernels.
    assert out == [str(tmp_path / "lowrank_fused" / "__init__.py"),
                   str(tmp_path / "triton_kernels" / "forward.py")]
