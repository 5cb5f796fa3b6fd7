"""The PEFT-upstream runner and its pytest plugin (tools/peft_upstream.py,
tools/peft_served_plugin.py), on a tiny synthetic test file instead of PEFT's suite: no
network, no PEFT checkout. One runner call = two pytest subprocesses (plain, served)."""
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

if importlib.util.find_spec("peft") is None:  # not imported here: the subprocesses do
    pytest.skip("needs peft", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tools/ is a package of the repository, not installed

from tools import peft_upstream  # noqa: E402

SYNTHETIC = '''
import importlib.util

import pytest
import torch
from torch import nn

import peft
from peft import LoraConfig, get_peft_model
from datasets import load_dataset  # noqa: F401  (stubbed when missing, as in PEFT's tests)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 12)
        self.v = nn.Linear(12, 6)
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def dora_model(target):
    torch.manual_seed(0)
    return get_peft_model(Small(), LoraConfig(r=2, target_modules=target, use_dora=True,
                                              init_lora_weights=False))


def test_dora_linear_forward_backward():
    model = dora_model(["q", "v"])
    model(torch.randn(3, 8)).sum().backward()
    assert model.base_model.model.q.lora_magnitude_vector["default"].weight.grad is not None


def test_exact_peft_class():  # passes on plain PEFT only: a served layer is a subclass
    model = dora_model(["q", "v"])
    assert type(model.base_model.model.q) is peft.tuners.lora.Linear


def test_conv_dora_not_served():
    model = dora_model(["conv"])
    model.base_model.model.conv(torch.randn(1, 2, 3, 3))


def test_no_peft_model():
    assert nn.Linear(2, 2)(torch.ones(2)).shape == (2,)


def test_stub_gone_at_run_time():
    # the stub is seen by the module's import only
    assert importlib.util.find_spec("datasets") is None or not getattr(
        __import__("datasets"), "__lowrank_fused_stub__", False)


@pytest.mark.skip(reason="test requires a hardware accelerator")
def test_needs_gpu():
    pass
'''


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_checkout")
    (root / "tests").mkdir()
    (root / "tests" / "test_synthetic.py").write_text(textwrap.dedent(SYNTHETIC))
    out = root / "summary.json"
    code = peft_upstream.main(["--peft-tests", str(root), "--select", "dora", "--out", str(out),
                               "--files", "tests/test_synthetic.py", "-k", "",
                               "--work", str(root / "work"), "--timeout", "300",
                               "--parallel"])
    data = json.loads(out.read_text())
    data["_code"], data["_work"] = code, root / "work"
    return data


def _records(summary, mode):
    return {r["nodeid"].split("::")[-1]: r
            for r in peft_upstream.read_jsonl(summary["_work"] / f"dora-{mode}.jsonl")}


def test_served_run_calls_the_operator_and_plain_run_does_not(summary):
    plain, served = _records(summary, "plain"), _records(summary, "served")
    assert plain["test_dora_linear_forward_backward"]["operator_calls"] == 0
    assert plain["test_dora_linear_forward_backward"]["outcome"] == "passed"
    run = served["test_dora_linear_forward_backward"]
    assert run["outcome"] == "passed" and run["served"] is True
    assert run["operator_calls"] >= 2 and run["served_calls"] >= 2  # q and v
    assert run["served_layers"] == 2 and run["enable_calls"] == 1
    assert sum(r.get("operator_calls", 0) for r in plain.values()) == 0
    assert summary["selections"]["dora"]["plain_operator_calls"] == 0


def test_served_only_failure_is_a_regression(summary):
    sel = summary["selections"]["dora"]
    assert [r["nodeid"].split("::")[-1] for r in sel["regressions"]] == ["test_exact_peft_class"]
    assert sel["n_regressions"] == 1 and summary["regressions_total"] == 1
    assert summary["_code"] == 1  # the runner's exit status says so
    assert sel["counts"]["plain"]["passed"] == 5 and sel["counts"]["served"]["failed"] == 1


def test_zero_call_tests_say_why(summary):
    sel = summary["selections"]["dora"]
    served = _records(summary, "served")
    conv = served["test_conv_dora_not_served"]
    assert conv["outcome"] == "passed" and conv["operator_calls"] == 0
    assert conv["fallbacks"] == {"Conv2d layers are not Linear": 1}
    why = sel["served_zero_operator_calls"]["why"]
    assert why["no layer servable: Conv2d layers are not Linear"] == 1
    assert why["no PEFT LoRA model built (nothing to serve)"] == 2
    assert sel["skipped_for_gpu"]["tests"] == ["tests/test_synthetic.py::test_needs_gpu"]


def test_stubs_are_recorded(summary):
    sel = summary["selections"]["dora"]
    if "datasets" in sel["stubbed_imports"]:
        assert _records(summary, "plain")["test_stub_gone_at_run_time"]["outcome"] == "passed"


def test_summarize_rules():
    rec = lambda nodeid, outcome, **kw: dict(nodeid=nodeid, outcome=outcome, **kw)  # noqa: E731
    plain = [rec("a", "passed"), rec("b", "failed", detail="offline mode huggingface.co"),
             rec("c", "failed", detail="boom"), rec("d", "skipped", detail="requires GPU"),
             rec("e", "passed")]
    served = [rec("a", "error", detail="x"), rec("b", "failed", detail="offline"),
              rec("c", "passed"), rec("d", "skipped", detail="requires GPU")]
    s = peft_upstream.summarize(plain, served)
    assert [r["nodeid"] for r in s["regressions"]] == ["a", "e"]  # e: missing when served
    assert s["failing_both_by_reason"] == {"needs the HF hub (no network here)": 1}
    assert s["passing_served_only"] == ["c"]
    assert s["skipped_for_gpu"]["tests"] == ["d"]
    assert peft_upstream.k_expression(["a", "b"], ["c"]) == "(a or b) and not (c)"
    assert peft_upstream.name_selected("Test::test_x_4bit", ["4bit"], ["vera"])
    assert not peft_upstream.name_selected("Test::test_vera_4bit", ["4bit"], ["vera"])
