"""DDP (gloo, 2 CPU processes) gives one process's gradients; FSDP2 wraps the layer."""
import os
import time
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank_fused import LowRankLinear, apply_low_rank

WORLD = 2
GLOBAL_BATCH = 8


def build(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)).double()
    apply_low_rank(model, ["0", "2"], 3, method, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return model


def batch():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64))


def single_process_grads(method):
    model = build(method)
    x, t = batch()
    nn.functional.mse_loss(model(x), t).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, method, wrapper, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"),
                            rank=rank, world_size=WORLD)
    try:
        model = build(method)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if wrapper == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for m in model.modules():
                if isinstance(m, LowRankLinear):
                    fully_shard(m)
            wrapped = fully_shard(model)
        x, t = batch()
        shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        nn.functional.mse_loss(wrapped(x[shard]), t[shard]).backward()
        grads = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad
                if hasattr(g, "full_tensor"):  # FSDP2 keeps DTensor shards
                    g = g.full_tensor()
                grads[n] = g.detach().clone()
        assert set(grads) == set(names)
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "grads.tmp"))
            os.replace(os.path.join(out_dir, "grads.tmp"), os.path.join(out_dir, "grads.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Both ranks are done; skip gloo's teardown, which now and then hangs or aborts on exit.
    os._exit(0)


def run_two_processes(method, wrapper, deadline_s=120):
    """Rank 0's gradients, within ``deadline_s``; workers left alive after that are killed."""
    with tempfile.TemporaryDirectory() as out_dir:
        result = os.path.join(out_dir, "grads.pt")
        ctx = mp.start_processes(_worker, args=(method, wrapper, out_dir), nprocs=WORLD,
                                 join=False, start_method="spawn")
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > end:
                    break
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        if not os.path.exists(result):
            pytest.fail(f"{wrapper} workers gave no result within {deadline_s} s")
        return torch.load(result)


@pytest.mark.parametrize("method", ["lora", "lora_xs"])
def test_ddp_gloo_matches_single_process(method):
    got = run_two_processes(method, "ddp")
    want = single_process_grads(method)
    assert set(got) == set(want) and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def _fsdp2_on_cpu_supported():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _fsdp2_on_cpu_supported(),
                    reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
def test_fsdp2_fully_shard_matches_single_process():
    got = run_two_processes("lora_fa", "fsdp2")
    want = single_process_grads("lora_fa")
    assert set(got) == set(want) and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
