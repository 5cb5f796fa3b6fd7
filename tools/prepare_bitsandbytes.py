"""Prepare the slimmed bitsandbytes a lent GPU machine needs (its image has none, and no network).

    python tools/prepare_bitsandbytes.py [--out .carry] [--cuda 130] [--wheel PATH]

Copies bitsandbytes 0.50.2 (its Python files, its metadata and licence) with two native
libraries only: the CPU one and libbitsandbytes_cuda<CUDA>.so (default 130: the machines' torch
is 2.11.0+cu130; bitsandbytes loads the library of torch's CUDA version, or the closest one of
the same major), about 5 MiB instead of 125. The source is the installed distribution (found
through its metadata; nothing is imported) or, with --wheel, a manylinux wheel file, e.g. from
``pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all:
--platform manylinux_2_24_x86_64 -d DIR``. The copy lands in OUT (git-ignored) as
OUT/bitsandbytes/ and OUT/bitsandbytes-0.50.2.dist-info/, built beside it and renamed into
place; tools/gpu_session.sh puts OUT on PYTHONPATH, and the device tool's call carries it
(``carry: [".carry"]``). A source without the CUDA library fails, naming what it has: a copy
that could only load the CPU library would make every 4-bit figure on the GPU a CPU one.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "0.50.2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = re.compile(r"^bitsandbytes/libbitsandbytes_[a-z]+\d*\.(so|dll|dylib)$")
KEPT_METADATA = ("METADATA", "WHEEL", "top_level.txt")


class PrepareError(RuntimeError):
    """The source cannot give the slimmed copy asked for."""


def wanted(path: str, cuda: str) -> bool:
    """Whether a file of the distribution (a path relative to site-packages) is kept."""
    parts = path.replace(os.sep, "/")
    if "__pycache__" in parts or parts.endswith(".pyc"):
        return False
    if parts.startswith("bitsandbytes/"):
        if NATIVE.match(parts):
            return parts.rsplit("/", 1)[1] in (f"libbitsandbytes_cuda{cuda}.so",
                                               "libbitsandbytes_cpu.so")
        return True
    if ".dist-info/" in parts:
        name = parts.split(".dist-info/", 1)[1]
        return name in KEPT_METADATA or name.startswith("licenses/") or name == "LICENSE"
    return False


def _installed_files():
    """{relative path: absolute path} of the installed bitsandbytes, and its version."""
    try:
        dist = importlib.metadata.distribution("bitsandbytes")
    except importlib.metadata.PackageNotFoundError as err:
        raise PrepareError("bitsandbytes is not installed here: install bitsandbytes=="
                           f"{VERSION} or pass --wheel PATH") from err
    files = {str(f): str(f.locate()) for f in dist.files or ()}
    return files, dist.version


def _wheel_files(wheel: str, into: str):
    """Unpacks the wheel's files into ``into``: {relative path: absolute path}, version."""
    name = os.path.basename(wheel)
    found = re.match(r"bitsandbytes-([^-]+)-", name)
    if not found:
        raise PrepareError(f"{wheel}: not a bitsandbytes wheel (expected bitsandbytes-"
                           f"{VERSION}-...-manylinux_..._x86_64.whl)")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into)
        names = [n for n in z.namelist() if not n.endswith("/")]
    return {n: os.path.join(into, n) for n in names}, found.group(1)


def prepare(out: str, cuda: str = "130", wheel: str = None) -> dict:
    """Writes the slimmed copy into ``out`` (replacing an earlier one); returns
    {"files", "bytes", "libraries", "source"}. Raises PrepareError, leaving ``out`` as it was."""
    with tempfile.TemporaryDirectory() as unpacked:
        files, version = _wheel_files(wheel, unpacked) if wheel else _installed_files()
        source = wheel or "the installed distribution"
        if version != VERSION:
            raise PrepareError(f"{source} is bitsandbytes {version}; {VERSION} is wanted")
        libraries = sorted(os.path.basename(p) for p in files if NATIVE.match(p))
        needed = [f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"]
        absent = [lib for lib in needed if lib not in libraries]
        if absent:
            raise PrepareError(
                f"{source} lacks {', '.join(absent)} (it has: {', '.join(libraries) or 'none'}); "
                f"get the manylinux wheel (pip download bitsandbytes=={VERSION} --no-deps "
                "--only-binary=:all: --platform manylinux_2_24_x86_64 -d DIR) and pass --wheel")
        kept = sorted(p for p in files if wanted(p, cuda))
        parent = os.path.dirname(os.path.abspath(out)) or "."
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".bitsandbytes-", dir=parent)
        old = None
        try:
            total = 0
            for rel in kept:
                target = os.path.join(staging, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(files[rel], target)
                total += os.path.getsize(target)
            if os.path.exists(out):
                old = tempfile.mkdtemp(prefix=".bitsandbytes-old-", dir=parent)
                os.rename(out, os.path.join(old, "previous"))
            os.rename(staging, out)
        except BaseException:
            if old and not os.path.exists(out):  # put the earlier copy back
                os.rename(os.path.join(old, "previous"), out)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if old:
                shutil.rmtree(old, ignore_errors=True)
    return {"files": len(kept), "bytes": total, "source": source,
            "libraries": [lib for lib in libraries if lib in needed]}


def check_import(out: str) -> str:
    """Imports the copy in a fresh interpreter (this machine loads its CPU library): the path
    it came from and its version."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(out), PYTHONDONTWRITEBYTECODE="1")
    code = ("import importlib.metadata as m, bitsandbytes as b; "
            "print(b.__file__, m.version('bitsandbytes'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or not lines[-1].startswith(os.path.abspath(out)):
        raise PrepareError(f"the copy in {out} does not import: {done.stderr.strip()[-500:]}")
    return lines[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, ".carry"),
                        help="where the copy goes (default: .carry in the repository; ignored)")
    parser.add_argument("--cuda", default="130",
                        help="the CUDA library to keep, as bitsandbytes names it (default 130)")
    parser.add_argument("--wheel", help="a bitsandbytes wheel file instead of the installed one")
    parser.add_argument("--no-check", action="store_true", help="skip the import check")
    args = parser.parse_args(argv)
    try:
        info = prepare(args.out, args.cuda, args.wheel)
        checked = "" if args.no_check else f"; imports: {check_import(args.out)}"
    except PrepareError as err:
        print(f"prepare_bitsandbytes: {err}", file=sys.stderr)
        return 1
    print(f"prepare_bitsandbytes: {info['files']} files, {info['bytes'] / 2**20:.1f} MiB, "
          f"libraries {', '.join(info['libraries'])}, from {info['source']} -> {args.out}{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
