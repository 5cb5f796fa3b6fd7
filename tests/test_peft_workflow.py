"""A PEFT user's whole workflow on a served model (issue 12): every step still reaches the fused
operator (counted), gives PEFT's own numbers, and keeps LoRA-FA / LoRA-XS what they were."""
import copy
import io
import os
import pickle
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="the peft package is not installed")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from peft_helpers import Small, counting_ops, nonzero_b, small_peft  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plain_peft_output(model, x):
    """What PEFT's own forward gives for ``model`` as it is now."""
    twin = copy.deepcopy(model)
    lfp.disable_fused(twin)
    with counting_ops() as calls:
        y = twin(x)
    assert not calls
    return y


def test_adapter_added_later_on_a_new_module_is_served():  # issue 12, failure 1
    model = small_peft(target_modules=["q"])
    x = torch.randn(5, 16)
    lfp.enable_fused(model)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["out", "v"]))
    nonzero_b(model)
    model.base_model.set_adapter(["default", "second"])
    with counting_ops() as calls:
        y = model(x)
    assert sorted(rank for *_, rank in calls) == [2, 2, 4]  # q (default), v and out (second)
    torch.testing.assert_close(y, plain_peft_output(model, x))


def test_layer_added_later_that_cannot_be_served_is_reported():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.q = nn.Linear(16, 4)

        def forward(self, ids):
            return self.q(self.emb(ids))

    model = get_peft_model(WithEmbedding(), LoraConfig(r=2, target_modules=["q"]))
    lfp.enable_fused(model)
    model.add_adapter("emb", LoraConfig(r=2, target_modules=["emb"]))
    model.base_model.set_adapter(["default", "emb"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.tensor([[1, 2, 3]]))
    reports = [str(w.message) for w in caught if "PEFT's own forward" in str(w.message)]
    assert reports == ["lowrank_fused: 1 LoRA layer runs PEFT's own forward: Embedding layers "
                       "are not Linear (base_model.model.emb)"]


def _lora_a_grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters() if "lora_A.default" in n}


def test_lora_fa_survives_peft_adapter_operations(tmp_path):  # issue 12, failure 2
    model = small_peft()
    assert lfp.freeze_lora_a(model) == 2
    other = small_peft(adapter_name="saved")
    other.save_pretrained(str(tmp_path))
    operations = {
        "add_adapter": lambda: model.add_adapter("second", LoraConfig(r=2, target_modules=["q"])),
        "set_adapter": lambda: model.set_adapter("default"),
        "disable_adapter_layers": lambda: model.base_model.disable_adapter_layers(),
        "enable_adapter_layers": lambda: model.base_model.enable_adapter_layers(),
        "load_adapter": lambda: model.load_adapter(str(tmp_path / "saved"), "loaded",
                                                   is_trainable=True),
        "set_adapter again": lambda: model.set_adapter("default"),
        "delete_adapter": lambda: model.delete_adapter("second"),
    }
    for what, operation in operations.items():
        operation()
        assert not any(_lora_a_grads(model).values()), what
    model.set_adapter("default")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_B.default" in n)
    # and so the fused backward never saves x: lora_A gets no gradient
    with lfp.enable_fused(model):
        model(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_served_model_copies_and_unpickles_served(how):  # issue 12, failure 3
    model = small_peft()
    x = torch.randn(4, 16)
    want = model(x)
    lfp.enable_fused(model)
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    with counting_ops() as calls:
        got = twin(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, want)
    twin.add_adapter("later", LoraConfig(r=2, target_modules=["out"]))  # still watched
    twin.set_adapter("later")
    with counting_ops() as calls:
        twin(x)
    assert [rank for *_, rank in calls] == [2]
    lfp.disable_fused(twin)
    with counting_ops() as calls:
        twin(x)
    assert not calls


def _lora_xs_model(adapter_name="default"):
    model = small_peft(r=3, lora_alpha=16, adapter_name=adapter_name)
    lfp.convert_to_lora_xs(model, adapter_name, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for latent in lfp.latents(model, adapter_name).values():
            latent.normal_(0, 0.3)  # a trained R, far from the identity
    return model.eval()


def test_load_lora_xs_any_adapter_name(tmp_path):  # issue 12, failure 4
    model = _lora_xs_model("other")
    x = torch.randn(6, 16)
    lfp.save_lora_xs(model, tmp_path, adapter="other")
    torch.manual_seed(0)  # the same base weights
    loaded = lfp.load_lora_xs(Small(), tmp_path).eval()
    assert set(lfp.latents(loaded, "other")) == set(lfp.latents(model, "other"))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_plain_peft_reads_save_lora_xs_files(tmp_path):  # issue 12, failure 5
    model = _lora_xs_model()
    x = torch.randn(6, 16)
    lfp.save_lora_xs(model, tmp_path)
    torch.manual_seed(0)  # the same base weights
    plain = PeftModel.from_pretrained(Small(), str(tmp_path)).eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-6, atol=1e-6)


def test_peft_save_pretrained_of_lora_xs_reads_back_in_plain_peft(tmp_path):  # failure 6
    model = _lora_xs_model()
    x = torch.randn(6, 16)
    model.save_pretrained(str(tmp_path))
    torch.manual_seed(0)  # the same base weights
    plain = PeftModel.from_pretrained(Small(), str(tmp_path)).eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-6, atol=1e-6)
    # our own state dict round trip keeps R and does not trip on the added product key
    twin = _lora_xs_model()
    with torch.no_grad():
        for latent in lfp.latents(twin).values():
            latent.zero_()
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    # and PEFT's file loaded into a LoRA-XS model brings R back, not the product over B
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    with torch.no_grad():
        for latent in lfp.latents(twin).values():
            latent.zero_()
    result = set_peft_model_state_dict(twin, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_dropout_follows_the_dropout_module():  # issue 12, failure 7
    model = small_peft(lora_dropout=0.4)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # PEFT then applies no dropout although the layer is in training
    x = torch.randn(5, 16)
    want = model(x)
    with lfp.enable_fused(model), counting_ops() as calls:
        got = model(x)
    assert [p for _, p, _ in calls] == [0.0, 0.0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dropout_of_one_is_accepted_and_zeroes_the_branch():  # issue 12, failure 7
    model = small_peft(lora_dropout=1.0)
    model.train()
    x = torch.randn(5, 16)
    y_plain = model(x)
    y_plain.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with lfp.enable_fused(model), counting_ops() as calls:
        y = model(x)
        y.sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(y, y_plain)
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_adapter_switching_and_merge_reach_the_operator():
    model = small_peft()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q", "v"]))
    nonzero_b(model)
    x = torch.randn(5, 16)
    lfp.enable_fused(model)
    for adapter, rank in (("second", 2), ("default", 4)):
        model.set_adapter(adapter)
        with counting_ops() as calls:
            y = model(x)
        assert [r for *_, r in calls] == [rank, rank], adapter
        torch.testing.assert_close(y, plain_peft_output(model, x))
    model.merge_adapter()
    with counting_ops() as calls:
        merged = model(x)
    assert not calls  # merged weights: PEFT's base-only path is the right one
    torch.testing.assert_close(merged, y, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    with counting_ops() as calls:
        torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)
    assert len(calls) == 2


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_modules_to_save_and_layers_to_transform():
    torch.manual_seed(0)
    model = get_peft_model(Stack(), LoraConfig(r=2, target_modules=["0"], layers_pattern="layers",
                                               layers_to_transform=[1, 2],
                                               modules_to_save=["head"]))
    nonzero_b(model)
    x = torch.randn(4, 8)
    want = model(x)
    fused = lfp.enable_fused(model)
    assert sorted(fused.served) == ["base_model.model.layers.1.0", "base_model.model.layers.2.0"]
    with counting_ops() as calls:
        y = model(x)
        y.square().sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    assert head and all(p.grad is not None for p in head)


def test_save_pretrained_and_load_adapter_both_ways(tmp_path):
    model = small_peft()
    x = torch.randn(5, 16)
    lfp.enable_fused(model)
    y = model(x)
    model.save_pretrained(str(tmp_path / "a"))  # a served model saves PEFT's plain files
    torch.manual_seed(0)
    plain = PeftModel.from_pretrained(Small(), str(tmp_path / "a"))
    torch.testing.assert_close(plain(x), y, rtol=1e-6, atol=1e-6)
    lfp.enable_fused(plain)  # and a plain PEFT file is served once loaded
    other = small_peft(r=2, target_modules=["v", "out"])
    other.save_pretrained(str(tmp_path / "b"))
    plain.load_adapter(str(tmp_path / "b"), "b")  # a new adapter, one new module
    plain.set_adapter("b")
    with counting_ops() as calls:
        got = plain(x)
    assert [r for *_, r in calls] == [2, 2]
    torch.testing.assert_close(got, plain_peft_output(plain, x))


def test_convert_to_lora_xs_keeps_modules_to_save_trainable():  # issue 14, item 8
    torch.manual_seed(0)
    model = get_peft_model(Stack(), LoraConfig(r=3, target_modules=r".*layers\.\d\.0",
                                               modules_to_save=["head"]))
    count = lfp.convert_to_lora_xs(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert count == 3 * 3 * 3
    assert {n for n in trainable if "latent" in n} == {
        f"base_model.model.layers.{i}.0.lora_B.default.parametrizations.weight.0.latent"
        for i in range(3)}
    assert {n for n in trainable if "latent" not in n} == {
        "base_model.model.head.modules_to_save.default.weight",
        "base_model.model.head.modules_to_save.default.bias"}


def test_inject_adapter_in_model_later_is_served():
    from peft import inject_adapter_in_model
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q"]), Small())
    assert lfp.enable_fused(model).served == ["q"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about a second peft_config
        model = inject_adapter_in_model(LoraConfig(r=3, target_modules=["v"]), model,
                                        adapter_name="second")
    nonzero_b(model)
    x = torch.randn(4, 16)
    with counting_ops() as calls:
        y = model(x)
    assert type(model.v) is lfp.FusedLoraLinear and [r for *_, r in calls] == [3]
    torch.testing.assert_close(y, plain_peft_output(model, x))


def test_lora_fa_composes_with_peft_lorafa_optimizer():
    from peft.optimizers import create_lorafa_optimizer
    model = small_peft()
    lfp.freeze_lora_a(model)
    lfp.enable_fused(model)
    optimizer = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with counting_ops() as calls:
        model(torch.randn(3, 16)).square().sum().backward()
    optimizer.step()
    assert len(calls) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"base_model.model.{m}.lora_B.default.weight" for m in "qv"}
