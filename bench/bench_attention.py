"""attention.py benchmarks on CPU, fp32: ratios against peers and limits, measured in one run.

1. speed: chunked_attention forward+backward against PyTorch's fused scaled_dot_product_attention
   (causal, GQA) at a length where the fused call still fits, interleaved repeats, best of each;
2. memory: chunked_attention forward+backward peak at T and 2T (plain and with the document
   mask): a linear method gives a ratio of ~2 at most, a quadratic one ~4 (the reference);
3. ring attention, P=2 gloo processes against P=1, the same total length, one thread per
   process: per-rank peak memory (ideal ratio 0.5) and time against the ideal half of P=1.

    python bench/bench_attention.py            (--quick: a short run; --parts ring: one part)

Each memory case runs in a fresh process: its peak resident set (VmHWM, reset just before the
case) minus the resident set when the case started, i.e. what forward+backward allocate on top of
the inputs. MALLOC_MMAP_THRESHOLD_ keeps large buffers in mmap so freed memory really leaves.
"""
import argparse
import math
import os
import socket
import sys
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by spawned children at start-up

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attention as A  # noqa: E402

MiB = 1 << 20


def resident_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_memory():
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset VmHWM to the current resident set


def make_inputs(batch, seq, n_heads, n_kv_heads, head_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, n_heads, head_dim, generator=generator)
    k = torch.randn(batch, seq, n_kv_heads, head_dim, generator=generator)
    v = torch.randn(batch, seq, n_kv_heads, head_dim, generator=generator)
    dout = torch.randn(batch, seq, n_heads, head_dim, generator=generator)
    return q, k, v, dout


def forward_backward_seconds(attention_fn, q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    start = time.perf_counter()
    attention_fn(q, k, v).backward(dout)
    return time.perf_counter() - start


def fused_sdpa(q, k, v):
    """The peer: one fused PyTorch call over the whole sequence, (B, T, H, D) in and out."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=True).transpose(1, 2)


def fused_sdpa_repeated_kv(q, k, v):
    """The same with K/V heads repeated first (the CPU kernel's own GQA path can be slower)."""
    n_groups = q.shape[2] // k.shape[2]
    return fused_sdpa(q, k.repeat_interleave(n_groups, 2), v.repeat_interleave(n_groups, 2))


# --- 1. speed -----------------------------------------------------------------------------------

def bench_speed(seq, block_sizes, repeats):
    shape = dict(batch=1, seq=seq, n_heads=8, n_kv_heads=2, head_dim=128)
    q, k, v, dout = make_inputs(**shape)
    candidates = {"fused SDPA": fused_sdpa, "fused SDPA, K/V repeated": fused_sdpa_repeated_kv}
    for block_size in block_sizes:
        candidates[f"chunked, block {block_size}"] = (
            lambda q, k, v, block_size=block_size: A.chunked_attention(
                q, k, v, block_size=block_size))
    best = {name: math.inf for name in candidates}
    for _ in range(repeats):  # interleaved, so that machine noise hits every candidate alike
        for name, attention_fn in candidates.items():
            best[name] = min(best[name], forward_backward_seconds(attention_fn, q, k, v, dout))
    print(f"\n1. speed, causal fwd+bwd, fp32, {torch.get_num_threads()} threads, {shape}, "
          f"best of {repeats}")
    peer = min(best["fused SDPA"], best["fused SDPA, K/V repeated"])  # the faster peer
    for name, seconds in best.items():
        print(f"   {name:26s} {seconds:7.2f} s  {seq / seconds:7.0f} tokens/s   "
              f"throughput vs the faster fused SDPA {peer / seconds:.2f}x (target >= 0.8)")


# --- 2. memory ----------------------------------------------------------------------------------

MEMORY_CASES = {
    "causal": lambda q, k, v, seq, block_size: A.chunked_attention(q, k, v,
                                                                    block_size=block_size),
    # 7 equal documents; the tiles that straddle a boundary take the math path
    "document mask": lambda q, k, v, seq, block_size: A.chunked_attention(
        q, k, v, doc_ids=(torch.arange(seq) * 7 // seq).view(1, seq), block_size=block_size),
    # the quadratic contrast: every score materialised
    "reference": lambda q, k, v, seq, block_size: A.reference_attention(q, k, v)[0],
}


def _memory_case(case, seq, block_size, results):
    q, k, v, dout = make_inputs(1, seq, 4, 1, 64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    reset_peak_memory()
    before = resident_mib("VmRSS")
    start = time.perf_counter()
    MEMORY_CASES[case](q, k, v, seq, block_size).backward(dout)
    results.put((resident_mib("VmHWM") - before, time.perf_counter() - start))


def run_in_fresh_process(target, *args):
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    result = results.get()
    process.join()
    return result


def bench_memory(seqs_by_case, block_size):
    print(f"\n2. memory, fwd+bwd peak on top of the inputs, block {block_size}, "
          f"(1, T, 4 heads, 1 KV head, 64), fresh process per case")
    for case, seqs in seqs_by_case.items():
        peaks = {}
        for seq in seqs:
            peaks[seq], seconds = run_in_fresh_process(_memory_case, case, seq, block_size)
            inputs_mib = 4 * seq * (4 + 1 + 1 + 4) * 64 / MiB  # q, k, v, dout in fp32
            print(f"   {case:13s} T={seq:6d} peak {peaks[seq]:7.1f} MiB "
                  f"(inputs {inputs_mib:5.1f} MiB), {seconds:5.1f} s")
        for short, long in zip(seqs, seqs[1:]):
            target = "" if case == "reference" else " (target <= 2.2)"
            print(f"   {case:13s} peak(T={long}) / peak(T={short}) = "
                  f"{peaks[long] / peaks[short]:.2f}{target}")


# --- 3. ring attention ---------------------------------------------------------------------------

def _ring_case(rank, world_size, port, seq, block_size, repeats, results):
    torch.set_num_threads(1)  # one core per rank; P=1 gets one core too
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    group = dist.group.WORLD
    full_inputs = make_inputs(1, seq, 8, 2, 64)

    def ring(q, k, v):
        return A.ring_attention(q, k, v, group, block_size=block_size)

    def shard_inputs():
        return [x[:, A.zigzag_indices(seq, rank, world_size)] for x in full_inputs]

    forward_backward_seconds(ring, *shard_inputs())  # warm-up (first gloo messages, kernels)
    reset_peak_memory()
    before = resident_mib("VmRSS")
    q, k, v, dout = shard_inputs()
    with_inputs = resident_mib("VmRSS")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ring(q, k, v).backward(dout)
    peak = resident_mib("VmHWM")
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        dist.barrier()
        cpu_start = time.process_time()  # this rank's own work, whatever else runs on the box
        seconds.append(forward_backward_seconds(ring, q, k, v, dout))
        cpu_seconds.append(time.process_time() - cpu_start)
    results.put((rank, peak - before, peak - with_inputs, min(seconds), min(cpu_seconds)))
    dist.barrier()
    dist.destroy_process_group()


def run_ring(world_size, seq, block_size, repeats):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_ring_case, args=(rank, world_size, port, seq,
                                                          block_size, repeats, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    reports = [results.get() for _ in range(world_size)]
    for process in processes:
        process.join()
    peak = max(report[1] for report in reports)
    peak_on_top_of_inputs = max(report[2] for report in reports)
    seconds = max(report[3] for report in reports)  # a step of the ring waits for the slowest
    cpu_seconds = sum(report[4] for report in reports)
    return peak, peak_on_top_of_inputs, seconds, cpu_seconds


def bench_ring(seq, block_size, repeats):
    print(f"\n3. ring attention, causal fwd+bwd, total T={seq}, (1, T, 8 heads, 2 KV heads, 64), "
          f"block {block_size}, gloo, 1 thread per rank, best of {repeats}")
    peak_1, extra_1, seconds_1, cpu_1 = run_ring(1, seq, block_size, repeats)
    peak_2, extra_2, seconds_2, cpu_2 = run_ring(2, seq, block_size, repeats)
    for world_size, peak, extra, seconds, cpu in ((1, peak_1, extra_1, seconds_1, cpu_1),
                                                  (2, peak_2, extra_2, seconds_2, cpu_2)):
        print(f"   P={world_size}: per-rank peak {peak:6.1f} MiB with its q/k/v/dout shards, "
              f"{extra:6.1f} MiB on top of them; {seconds:6.2f} s wall, "
              f"{cpu:6.2f} s CPU (all ranks)")
    print(f"   per-rank peak P=2 / P=1 = {peak_2 / peak_1:.2f} with the shards, "
          f"{extra_2 / extra_1:.2f} on top of them (ideal 0.50; the ring's double buffers for "
          f"K/V and dK/dV come on top)")
    print(f"   wall time P=2 / (wall time P=1 / 2) = {seconds_2 / (seconds_1 / 2):.2f} "
          f"(1.00 = no overhead; includes waiting for messages and for a core)")
    print(f"   CPU time of all ranks P=2 / P=1 = {cpu_2 / cpu_1:.2f} "
          f"(the extra work of splitting: merges, copies, gloo; 1.00 = none)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, fewer repeats")
    parser.add_argument("--parts", default="speed,memory,ring",
                        help="comma-separated subset of speed,memory,ring")
    args = parser.parse_args()
    parts = args.parts.split(",")
    sys.stdout.reconfigure(line_buffering=True)  # progress shows even when piped to a file
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"default block size {A.DEFAULT_BLOCK_SIZE}, load average before the run "
          f"{os.getloadavg()[0]:.1f}")
    if "speed" in parts:
        if args.quick:
            bench_speed(4096, [1024, A.DEFAULT_BLOCK_SIZE], repeats=2)
        else:
            bench_speed(8192, [1024, 2048, A.DEFAULT_BLOCK_SIZE], repeats=3)
    if "memory" in parts:
        if args.quick:
            bench_memory({"causal": [4096, 8192], "document mask": [2048, 4096],
                          "reference": [1024, 2048]}, block_size=1024)
        else:
            bench_memory({"causal": [8192, 16384, 32768], "document mask": [8192, 16384],
                          "reference": [2048, 4096]}, block_size=A.DEFAULT_BLOCK_SIZE)
    if "ring" in parts:
        if args.quick:
            bench_ring(4096, block_size=1024, repeats=2)
        else:
            bench_ring(16384, block_size=A.DEFAULT_BLOCK_SIZE, repeats=2)


if __name__ == "__main__":
    main()
