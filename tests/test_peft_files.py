"""LoRA-XS files are never half-written and never half-read (issue 14, items 4-6 and the
stress test): a failure leaves the adapter on disk and the model in memory as they were."""
import json

import pytest
import torch

pytest.importorskip("peft", reason="the peft package is not installed")
import safetensors.torch  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from lowrank_fused.peft import files  # noqa: E402
from peft_helpers import Small, small_peft  # noqa: E402


def lora_xs_model(seed=3, alpha=16):
    model = small_peft(r=3, lora_alpha=alpha)
    lfp.convert_to_lora_xs(model, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for latent in lfp.latents(model).values():
            latent.copy_(torch.randn(latent.shape, generator=generator) * 0.3)
    return model.eval()


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def base_model():
    torch.manual_seed(0)  # small_peft's base weights
    return Small()


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, state):
    assert not any("lora" in name for name, _ in model.named_modules())
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_saving_an_unconverted_model_keeps_the_previous_adapter(tmp_path):  # item 4
    lfp.save_lora_xs(lora_xs_model(), tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter")
    with pytest.raises(ValueError, match="convert_to_lora_xs first"):
        lfp.save_lora_xs(small_peft(), tmp_path / "adapter")
    assert snapshot(tmp_path / "adapter") == before


@pytest.mark.parametrize("failing_write", [1, 2])
def test_a_crash_between_files_keeps_the_previous_adapter(tmp_path, monkeypatch, failing_write):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("notes of the user")
    lfp.save_lora_xs(lora_xs_model(), tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter")
    real, writes = safetensors.torch.save_file, []

    def crashing(tensors, filename, *args, **kwargs):
        writes.append(filename)
        if len(writes) == failing_write:
            raise OSError("disk full (injected)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crashing)
    with pytest.raises(OSError, match="injected"):
        lfp.save_lora_xs(lora_xs_model(seed=4, alpha=8), tmp_path / "adapter")
    assert snapshot(tmp_path / "adapter") == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left
    monkeypatch.undo()
    lfp.save_lora_xs(lora_xs_model(seed=4), tmp_path / "adapter")  # the user's file stays
    assert (tmp_path / "adapter" / "README.md").read_text() == "notes of the user"


def rewrite_latents(folder, change):
    """Hand-edit the latent file (and its digest, so only the content check can object)."""
    tensors = safetensors.torch.load_file(str(folder / lfp.LATENT_FILE))
    change(tensors)
    safetensors.torch.save_file(tensors, str(folder / lfp.LATENT_FILE))
    config = json.loads((folder / lfp.LATENT_CONFIG).read_text())
    config["sha256"][lfp.LATENT_FILE] = files._sha256((folder / lfp.LATENT_FILE).read_bytes())
    (folder / lfp.LATENT_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"base_model.model.q.latent": torch.ones(1, 1)}),
     r"latent of 'q' .* \(1, 1\), expected .* \(3, 3\)"),
    (lambda t: t.update({"base_model.model.v.latent": torch.ones(3)}),
     r"latent of 'v' .* \(3,\), expected .* \(3, 3\)"),
    (lambda t: t.update({"base_model.model.q.latent": torch.ones(3, 3, dtype=torch.int64)}),
     r"latent of 'q' .* is torch.int64"),
    (lambda t: t.update({"base_model.model.q.factor": t["base_model.model.q.factor"].double()}),
     r"factor of 'q' .* is torch.float64 .*, expected torch.float32 \(lora_A's dtype\)"),
    (lambda t: t.pop("base_model.model.v.latent"),
     r"missing keys \['base_model.model.v.latent'\]"),
    (lambda t: t.update({"base_model.model.out.latent": torch.ones(3, 3)}),
     r"unexpected keys \['base_model.model.out.latent'\]"),
    (lambda t: t["base_model.model.q.latent"].add_(1.0),
     r"lora_B .* is not factor·latentᵀ"),
])
def test_latent_shapes_dtypes_and_keys_are_checked(tmp_path, change, message):  # item 5
    lfp.save_lora_xs(lora_xs_model(), tmp_path)
    rewrite_latents(tmp_path, change)
    base = base_model()
    state = base_state(base)
    with pytest.raises(ValueError, match=message):
        lfp.load_lora_xs(base, tmp_path)
    assert_untouched(base, state)


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def corrupt_start(path):
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def corrupt_end(path):  # the tensor data of a safetensors file; the closing brace of a JSON file
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x7f\x01\x02\x03"
    path.write_bytes(bytes(data))


def delete(path):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate, corrupt_start, corrupt_end, delete])
@pytest.mark.parametrize("name", [files.PEFT_CONFIG, files.PEFT_WEIGHTS, lfp.LATENT_FILE,
                                  lfp.LATENT_CONFIG])
def test_stress_every_damaged_file_is_refused_before_the_model_changes(tmp_path, name, damage):
    x = torch.randn(4, 16)
    good = lora_xs_model()
    lfp.save_lora_xs(good, tmp_path / "previous")
    lfp.save_lora_xs(lora_xs_model(seed=5), tmp_path / "damaged")
    previous = snapshot(tmp_path / "previous")
    damage(tmp_path / "damaged" / name)
    base = base_model()
    state = base_state(base)
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        lfp.load_lora_xs(base, tmp_path / "damaged")
    assert name in str(caught.value)  # the error names the file
    assert_untouched(base, state)
    assert snapshot(tmp_path / "previous") == previous
    torch.testing.assert_close(lfp.load_lora_xs(base, tmp_path / "previous").eval()(x), good(x),
                               rtol=0, atol=0)
