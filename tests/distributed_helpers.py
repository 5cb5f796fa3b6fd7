"""Two gloo processes on the CPU for the distributed tests: start them, wait with a deadline,
kill what is left, and hand back what rank 0 wrote."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def init_gloo(rank: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"),
                            rank=rank, world_size=WORLD)


def write_result(rank: int, out_dir: str, result) -> None:
    """Rank 0 writes ``result`` (temporary file, then renamed); both ranks then leave without
    gloo's teardown, which now and then hangs or aborts on exit."""
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.tmp"))
        os.replace(os.path.join(out_dir, "result.tmp"), os.path.join(out_dir, "result.pt"))
    dist.barrier()
    os._exit(0)


def run_two_processes(worker, args: tuple, out_dir: str, deadline_s: float = 120):
    """Run ``worker(rank, *args, out_dir)`` on two processes; rank 0's result within
    ``deadline_s``. A worker that raises must call ``dist.destroy_process_group()`` first."""
    result = os.path.join(out_dir, "result.pt")
    ctx = mp.start_processes(worker, args=(*args, out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
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
        pytest.fail(f"the workers gave no result within {deadline_s} s")
    return torch.load(result, weights_only=False)
