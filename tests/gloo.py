"""Run a check on N spawned gloo processes on this machine and gather what every rank found.

`checks(rank, world_size)` runs inside an initialised process group and returns a list of
failure messages; the test asserts that every rank reported and that the list is empty. A hang
(a deadlocked ring, ranks that disagree on a step) is killed rather than outliving the test.
"""
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(checks, rank, world_size, port, results):
    torch.set_num_threads(1)  # several processes share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        failures = checks(rank, world_size)
    except Exception:  # report it: the parent's assertion shows the traceback
        failures = [f"rank {rank}: {traceback.format_exc()}"]
    results.put((rank, failures))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_gloo(checks, world_size: int, timeout: float = 180) -> list[str]:
    """Every rank's failures, in rank order; asserts that every rank reported."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(checks, rank, world_size, port, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        reports = dict(results.get(timeout=timeout) for _ in range(world_size))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert sorted(reports) == list(range(world_size))
    return [failure for rank in sorted(reports) for failure in reports[rank]]
