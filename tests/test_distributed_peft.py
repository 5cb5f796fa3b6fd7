"""A served PEFT model trained under FSDP2 and DDP (issue 29, item 8): 2 gloo processes on the
CPU, a tiny Llama from a config with LoRA, LoRA-FA, DoRA and LoRA over a bitsandbytes 4-bit
base. Each combination trains a few steps plain and served (served after wrapping, as
FusedLoraCallback does once accelerate has prepared the model); the losses agree, the operator
ran every call, and the adapter saved from the sharded model is plain PEFT files that load
unsharded with the sharded model's outputs.

FSDP2 wraps as accelerate's FSDP2 plugin does: ``fully_shard`` per decoder layer, then at the
root. One spawn runs every combination (the processes' imports dominate the time)."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("peft", reason="the peft package is not installed")
pytest.importorskip("transformers", reason="the tiny Llama needs transformers")

from distributed_helpers import WORLD, init_gloo, run_two_processes, write_result  # noqa: E402
from peft_helpers import LLAMA_TARGETS, nonzero_b, tiny_llama, token_ids  # noqa: E402

METHODS = ("lora", "lora_fa", "dora", "qlora")
WRAPPERS = ("ddp", "fsdp2")
STEPS = 3
LAYERS = 14
PER_RANK = 2


def _bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def runnable(wrapper, method):
    """None, or why this combination cannot run here."""
    if method == "qlora" and not _bitsandbytes():
        return "bitsandbytes is not installed"
    if wrapper == "fsdp2" and not _fsdp2():
        return "this torch has no torch.distributed.fsdp.fully_shard (FSDP2)"
    return None


def quantized_llama():
    """``tiny_llama`` with its projections in bitsandbytes NF4, built as bitsandbytes builds a
    Linear4bit (the module keeps the quant state too: FSDP's unsharded weight lacks it, and
    bitsandbytes' forward takes it back from the module)."""
    import bitsandbytes as bnb

    model = tiny_llama()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.split(".")[-1] not in LLAMA_TARGETS:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.detach().clone(), requires_grad=False,
                                     quant_type="nf4", module=q)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))  # .to() quantizes
    return model


def build(method):
    """The same PEFT model on every rank and in the test process."""
    from peft import LoraConfig, get_peft_model

    from lowrank_fused import peft as lfp

    base = quantized_llama() if method == "qlora" else tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                            use_dora=method == "dora"))
    nonzero_b(model)
    if method == "lora_fa":
        lfp.freeze_lora_a(model)
    return model


def probe_ids():
    return token_ids(batch=2, seq=8, seed=99)


def _wrap(model, wrapper):
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _save_adapter(model, wrapper, rank, path):
    """What accelerate does: the full state dict (gathered from the shards under FSDP2), and
    PEFT's save_pretrained on rank 0."""
    state = None
    if wrapper == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    if rank == 0:
        model.save_pretrained(path, state_dict=state)


def _train(rank, wrapper, method, served, out_dir):
    from lowrank_fused import peft as lfp

    model = build(method)
    wrapped = _wrap(model, wrapper)
    if served:
        lfp.enable_fused(model, backend="reference", strict=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        ids = token_ids(batch=WORLD * PER_RANK, seq=8, seed=step)
        ids = ids[rank * PER_RANK:(rank + 1) * PER_RANK]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / WORLD)
    with torch.no_grad():
        logits = wrapped(input_ids=probe_ids()).logits.detach().clone()
    record = {"losses": losses, "logits": logits}
    if served:
        record["calls"] = lfp.stats(model).backends
        record["adapter"] = os.path.join(out_dir, f"{wrapper}-{method}")
        _save_adapter(model, wrapper, rank, record["adapter"])
    return record


def _worker(rank, combinations, out_dir):
    init_gloo(rank, out_dir)
    results = {}
    try:
        import warnings
        warnings.simplefilter("ignore")  # PEFT's and transformers' notices, once per process
        for wrapper, method in combinations:
            for served in (False, True):
                results[wrapper, method, served] = _train(rank, wrapper, method, served, out_dir)
                dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    write_result(rank, out_dir, results)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    combinations = [(w, m) for w in WRAPPERS for m in METHODS if runnable(w, m) is None]
    if not combinations:
        pytest.skip("no combination can run here")
    out_dir = str(tmp_path_factory.mktemp("distributed_peft"))
    return run_two_processes(_worker, (combinations,), out_dir, deadline_s=300)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_served_peft_trains_sharded_as_plain_peft_and_saves_plain_files(trained, wrapper,
                                                                         method):
    from peft import PeftModel, get_peft_model_state_dict

    from lowrank_fused import peft as lfp

    why = runnable(wrapper, method)
    if why is not None:
        pytest.skip(why)
    plain, served = trained[wrapper, method, False], trained[wrapper, method, True]
    torch.testing.assert_close(torch.tensor(served["losses"]), torch.tensor(plain["losses"]),
                               rtol=1e-5, atol=1e-6)
    # every layer ran the operator: each training step forward and backward, and the probe
    assert served["calls"] == {"reference": {"forward": LAYERS * (STEPS + 1),
                                             "backward": LAYERS * STEPS}}
    torch.testing.assert_close(served["logits"], plain["logits"], rtol=1e-5, atol=1e-5)

    # the adapter saved from the sharded model: PEFT's keys, loaded unsharded by plain PEFT
    loaded = PeftModel.from_pretrained(quantized_llama() if method == "qlora" else tiny_llama(),
                                       served["adapter"])
    assert not any(isinstance(m, lfp.FusedLoraLinear) for m in loaded.modules())
    assert set(get_peft_model_state_dict(loaded)) == set(get_peft_model_state_dict(build(method)))
    # in train mode (no dropout anywhere): in eval, bitsandbytes' CPU inference path repacks a
    # 4-bit weight for its own kernel, which refuses this tiny model's widths
    loaded.train()
    with torch.no_grad():
        logits = loaded(input_ids=probe_ids()).logits
    torch.testing.assert_close(logits, served["logits"], rtol=1e-5, atol=1e-5)
