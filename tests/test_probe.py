"""tools.probe's dry run: the same code path on tiny CPU shapes, predictions, JSON."""
import json

from tools import probe


def test_dry_run_writes_predictions_without_measurements(tmp_path):
    out = tmp_path / "probe.json"
    result = probe.run(str(out), quick=True)
    saved = json.loads(out.read_text())
    assert saved["dry_run"] is True and result["figures"] == saved["figures"]
    names = [f["name"] for f in saved["figures"]]
    assert any("Triton fused_linear" in n for n in names)
    assert any("kernel grad_a" in n for n in names)
    timed = [f for f in saved["figures"] if "measured_ms" in f]
    assert timed and all(f["measured_ms"] is None for f in timed)
    assert all(f["predicted_ms"] > 0 for f in timed if "kernel" in f["name"])
    assert out.stat().st_size < 100_000
