"""pytest plugin: run PEFT's own test suite with every PEFT LoRA model served by lowrank_fused.

Load it with ``-p tools.peft_served_plugin`` (the worktree on ``sys.path``). Environment:

- ``LOWRANK_SERVE_PEFT=1``: serve. ``peft.tuners.tuners_utils.BaseTuner.inject_adapter`` is
  wrapped: after it runs on a model that holds PEFT LoRA layers, ``lowrank_fused.peft.enable_fused``
  is applied to that model. Every path that builds LoRA layers goes through it:
  ``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``/``load_adapter``,
  ``inject_adapter_in_model``, mixed models. Layers created afterwards are served anyway by the
  pre-hook ``enable_fused`` leaves on the model. Unset (or 0): plain PEFT, only counted.
- ``LOWRANK_PEFT_RESULTS=FILE``: one JSON line per test appended to FILE: nodeid, outcome
  (passed / failed / skipped / error), whether served, the operator's calls, the served forward's
  calls, served layer count, fallbacks (reason -> count), skip reason or the failure's last line.
- ``LOWRANK_PEFT_STUBS=0``: do not stub missing imports (default: stub, see ``STUBS``).

Operator calls are counted where the repository's own PEFT tests count them
(``tests/peft_helpers.counting_ops``): ``ops.run_forward`` (the one body every path runs: eager
autograd Function, no-grad call, custom op under torch.compile; plain, DoRA and 4-bit calls
alike). ``served_calls`` counts entries into
``low_rank_linear`` from a served layer's forward (``lowrank_fused.peft.serving``).

Stubs: PEFT's shared test modules import packages that are not installed here
(``tests/testing_common.py``: ``from diffusers import StableDiffusionPipeline``, used only in an
``isinstance`` check; ``tests/testing_utils.py``: ``from datasets import load_dataset``, used
only by dataset-loading helpers; ``tests/test_common_gpu.py`` / ``test_gpu_examples.py``:
``parameterized``, ``datasets``). A missing one is a stub module in ``sys.modules`` only while a
test module is imported (collection), so the test module binds its names, and afterwards
``import datasets`` and transformers' ``is_datasets_available()`` see the package missing, as it
is (transformers' trainer, which asks at its own import, is imported before any stub). A stub's
classes are never instances of anything and raise when built, its functions raise
``ModuleNotFoundError``, so a test that really uses one fails (plain and served alike) instead of
passing silently; ``diffusers.__version__`` is "0.0.0"; ``parameterized.expand`` is a small
working implementation (the generated tests are named as the real package names them). What
was stubbed is written in every result line.
"""
from __future__ import annotations

import collections
import functools
import importlib.machinery
import importlib.util
import inspect
import json
import os
import re
import sys
import types

import pytest

SERVE_ENV = "LOWRANK_SERVE_PEFT"
RESULTS_ENV = "LOWRANK_PEFT_RESULTS"
STUBS_ENV = "LOWRANK_PEFT_STUBS"

#: missing module -> what of it PEFT's tests import
STUBS = {
    "diffusers": ["StableDiffusionPipeline", "__version__"],
    "datasets": ["load_dataset", "Audio", "Dataset", "DatasetDict"],
    "parameterized": ["parameterized"],
}

STUBBED: list[str] = []  # the modules of STUBS that are not installed here


def serving_enabled() -> bool:
    return os.environ.get(SERVE_ENV, "0") not in ("", "0", "false", "False")


# ----------------------------------------------------------------------------------- stubs
def _missing(module: str, name: str):
    def raiser(*args, **kwargs):
        raise ModuleNotFoundError(f"{module} is not installed ({module}.{name} is a stub of "
                                  "tools.peft_served_plugin)")
    return raiser


def _stub_class(module: str, name: str) -> type:
    def __new__(cls, *args, **kwargs):
        _missing(module, name)()

    cls = type(name, (), {"__new__": __new__, "__module__": module,
                          "from_pretrained": classmethod(lambda cls, *a, **k: cls())})
    return cls


def _to_safe_name(text: str) -> str:
    return str(re.sub("[^a-zA-Z0-9_]+", "_", text))


class _Parameterized:
    """``parameterized.expand`` as the parameterized package does it for test methods: one
    method per parameter set, named ``{name}_{index}_{first parameter}``, put into the class
    body being defined; the decorated function itself is no longer a test."""

    @staticmethod
    def expand(inputs, name_func=None, doc_func=None, skip_on_empty=False, **kwargs):
        def decorator(func):
            frame_locals = inspect.currentframe().f_back.f_locals
            for index, params in enumerate(inputs):
                args = tuple(params) if isinstance(params, (tuple, list)) else (params,)
                if name_func is not None:
                    name = name_func(func, index, types.SimpleNamespace(args=args, kwargs={}))
                else:
                    suffix = _to_safe_name(str(args[0])) if args else ""
                    name = f"{func.__name__}_{index}" + (f"_{suffix}" if suffix else "")

                @functools.wraps(func)
                def method(self, *a, _args=args, **k):
                    return func(self, *_args, *a, **k)

                method.__name__ = name
                method.__qualname__ = name
                del method.__wrapped__  # pytest must not read func's own signature
                frame_locals[name] = method

            def not_a_test(*args, **kwargs):
                pytest.skip("parameterized.expand placeholder")

            not_a_test.__test__ = False
            return not_a_test

        return decorator


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__lowrank_fused_stub__ = True
    for attr in STUBS[name]:
        if name == "parameterized" and attr == "parameterized":
            value = _Parameterized
        elif attr == "__version__":
            value = "0.0.0"  # older than any release: version-gated code takes the old path
        elif attr[:1].isupper():
            value = _stub_class(name, attr)
        else:
            value = _missing(name, attr)
        setattr(module, attr, value)
    return module


_STUB_MODULES: dict[str, types.ModuleType] = {}


def stubs_wanted() -> list[str]:
    """The modules of ``STUBS`` that are not installed (and so get a stub)."""
    if os.environ.get(STUBS_ENV, "1") in ("0", "false", "False"):
        return []
    if not STUBBED:
        for name in STUBS:
            real = sys.modules.get(name)
            if real is not None and not getattr(real, "__lowrank_fused_stub__", False):
                continue
            if real is None and importlib.util.find_spec(name) is not None:
                continue
            STUBBED.append(name)
            _STUB_MODULES[name] = _stub_module(name)
    return STUBBED


def push_stubs() -> list[str]:
    """Put the stubs into ``sys.modules`` (while a test module imports); returns those put."""
    added = []
    for name in stubs_wanted():
        if name not in sys.modules:
            sys.modules[name] = _STUB_MODULES[name]
            added.append(name)
    return added


def pop_stubs(added) -> None:
    """Take the stubs out again: after a test module's import, ``import datasets`` (and
    transformers' ``is_datasets_available()``) see the package as missing, as it is; the test
    module keeps the names it bound."""
    for name in added:
        if sys.modules.get(name) is _STUB_MODULES.get(name):
            del sys.modules[name]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    if not isinstance(collector, pytest.Module):
        yield
        return
    added = push_stubs()
    try:
        yield
    finally:
        pop_stubs(added)


# ------------------------------------------------------------------------------ counting
class Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.operator_calls = 0
        self.served_calls = 0
        self.enable_calls = 0
        self.served_layers = 0
        self.fallbacks: collections.Counter = collections.Counter()


COUNTERS = Counters()
_PATCHED: list[tuple[object, str, object]] = []


def _patch(owner, name, make):
    real = getattr(owner, name)
    setattr(owner, name, make(real))
    _PATCHED.append((owner, name, real))


def _counting_call(real, attr):
    @functools.wraps(real)
    def counted(*args, **kwargs):
        setattr(COUNTERS, attr, getattr(COUNTERS, attr) + 1)
        return real(*args, **kwargs)
    return counted


def install_counters() -> None:
    """Count the operator's calls (plain runs too: they must read 0)."""
    import lowrank_fused.functional as functional
    import lowrank_fused.ops as ops
    from lowrank_fused.peft import serving

    for owner in (ops, functional):
        _patch(owner, "run_forward", lambda real: _counting_call(real, "operator_calls"))
    _patch(serving, "low_rank_linear", lambda real: _counting_call(real, "served_calls"))

    def make_report(real):
        @functools.wraps(real)
        def report(module, reason, *args, **kwargs):
            COUNTERS.fallbacks[reason] += 1
            return real(module, reason, *args, **kwargs)
        return report

    _patch(serving, "_report_once", make_report)


def install_serving() -> None:
    """Wrap ``BaseTuner.inject_adapter``: every model PEFT injects LoRA layers into is served."""
    from peft.tuners.tuners_utils import BaseTuner

    from lowrank_fused.peft import enable_fused
    from lowrank_fused.peft.lora_layers import lora_layers

    def make(real):
        @functools.wraps(real)
        def inject_adapter(self, model, *args, **kwargs):
            out = real(self, model, *args, **kwargs)
            if lora_layers(model):
                result = enable_fused(model)
                COUNTERS.enable_calls += 1
                COUNTERS.served_layers = max(COUNTERS.served_layers, len(result.served))
            return out
        return inject_adapter

    _patch(BaseTuner, "inject_adapter", make)


def uninstall() -> None:
    while _PATCHED:
        owner, name, real = _PATCHED.pop()
        setattr(owner, name, real)


# ------------------------------------------------------------------------------ pytest hooks
_REPORTS: dict[str, list] = {}


def pytest_configure(config):
    install_counters()
    # transformers' trainer decides at import whether datasets is there: import it first, so no
    # stub is ever seen outside the test modules' own imports
    try:
        import transformers.trainer  # noqa: F401
    except ImportError:
        pass

    stubs_wanted()
    if serving_enabled():
        install_serving()


def pytest_unconfigure(config):
    uninstall()


def pytest_report_header(config):
    mode = "served (lowrank_fused.peft.enable_fused)" if serving_enabled() else "plain PEFT"
    return [f"peft_served_plugin: {mode}; stubbed imports: {', '.join(STUBBED) or 'none'}"]


def pytest_runtest_logstart(nodeid, location):
    COUNTERS.reset()
    _REPORTS[nodeid] = []


def pytest_runtest_logreport(report):
    _REPORTS.setdefault(report.nodeid, []).append(report)


def _last_line(report) -> str:
    text = str(report.longrepr) if report.longrepr is not None else ""
    crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
    if crash:
        text = crash
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:400]


def outcome_of(reports) -> tuple[str, str]:
    """(outcome, detail) of one test from its setup/call/teardown reports: a failing setup or
    teardown is an error, a failing call a failure, a skip (or xfail) is skipped."""
    outcome, detail = "passed", ""
    for report in reports:
        if report.failed:
            if report.when == "call":
                return "failed", _last_line(report)
            return "error", _last_line(report)
        if report.skipped:
            outcome = "skipped"
            if hasattr(report, "wasxfail"):
                detail = f"xfail: {report.wasxfail}"
            elif isinstance(report.longrepr, tuple):
                detail = str(report.longrepr[2])
            else:
                detail = _last_line(report)
    return outcome, detail


def _write(record: dict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def pytest_collectreport(report):
    if report.failed:  # a module that does not import: none of its tests ran
        _write({"nodeid": report.nodeid, "outcome": "collection_error",
                "detail": _last_line(report), "served": serving_enabled(),
                "stubbed": list(STUBBED)})
    elif report.skipped:  # a module skipped whole at import (pytest.skip(allow_module_level))
        detail = (str(report.longrepr[2]) if isinstance(report.longrepr, tuple)
                  else _last_line(report))
        _write({"nodeid": report.nodeid, "outcome": "skipped", "detail": detail,
                "module_skip": True, "served": serving_enabled(), "stubbed": list(STUBBED)})


def pytest_runtest_logfinish(nodeid, location):
    outcome, detail = outcome_of(_REPORTS.pop(nodeid, []))
    _write({
        "nodeid": nodeid,
        "outcome": outcome,
        "detail": detail,
        "served": serving_enabled(),
        "operator_calls": COUNTERS.operator_calls,
        "served_calls": COUNTERS.served_calls,
        "enable_calls": COUNTERS.enable_calls,
        "served_layers": COUNTERS.served_layers,
        "fallbacks": dict(COUNTERS.fallbacks),
        "stubbed": list(STUBBED),
    })
