"""Import ``lowrank_fused.triton_kernels`` from a source checkout that was never installed.

setup.py installs the top-level ``triton_kernels/`` folder as ``lowrank_fused.triton_kernels``
(a top-level ``triton_kernels`` package is taken). A tree used as it is (copied to a GPU machine,
a git worktree on ``PYTHONPATH``) has no such subpackage; this finder maps the name to the
folder beside the package, so the kernels import from the tree they were read from. It answers
for that one name and only when the package holds no ``triton_kernels`` of its own.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
NAME = "lowrank_fused.triton_kernels"
SOURCE_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "triton_kernels")


class _SiblingKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``lowrank_fused.triton_kernels`` in the checkout's ``triton_kernels/``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(
            NAME, os.path.join(SOURCE_DIR, "__init__.py"), submodule_search_locations=[SOURCE_DIR])


def install() -> None:
    """Put the finder first on ``sys.meta_path`` when this is a source checkout (once)."""
    installed_layout = os.path.isdir(os.path.join(PACKAGE_DIR, "triton_kernels"))
    in_checkout = os.path.isfile(os.path.join(SOURCE_DIR, "__init__.py"))
    if installed_layout or not in_checkout:
        return
    if not any(isinstance(f, _SiblingKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SiblingKernelsFinder())
