"""GPU checks of attention.py, for a machine with one CUDA GPU (run by bench/gpu_check.sh).

1. exactness on CUDA: chunked_attention (fused CUDA kernels per tile, document-mask tiles in the
   math path) against reference_attention, outputs and gradients, fp32 and bf16;
2. speed: chunked_attention forward+backward in bf16 at Llama 3.1 8B's attention shape (32 query
   heads, 8 KV heads, head_dim 128), causal, against PyTorch's fused SDPA on the same inputs in
   the same run, in TFLOP/s (causal forward+backward = 7 T^2 H D FLOPs);
3. with --profile: where the time of one forward+backward goes (torch.profiler, GPU kernels):
   the attention kernels themselves against everything around them (merges, accumulation, K/V
   head copies) and against the wall-clock time.

    python bench/bench_gpu.py            (--quick: small sizes; --device cpu to try it anywhere)
    python bench/bench_gpu.py --blocks 4096,16384 --ablations --profile \\
        --baseline old/attention.py       (an older attention.py, timed in the same run)

Variants timed beside the default chunked_attention: other block sizes (--blocks); with
--ablations, the same code forced onto FlashAttention-2 (torch.nn.attention.sdpa_kernel around the
forward and the backward) and with the KV heads repeated before each kernel call.
"""
import argparse
import importlib.util
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attention as A  # noqa: E402

H, KV, D = 32, 8, 128  # Llama 3.1 8B's attention


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exactness(device, dtype, T, block, doc_mask):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, T, 8, 64, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, T, 2, 64, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, T, 2, 64, device=device, dtype=dtype, generator=g).requires_grad_()
    doc = (torch.arange(T, device=device) // (T // 3 + 7))[None] if doc_mask else None
    dout = torch.randn(1, T, 8, 64, device=device, dtype=dtype, generator=g)
    out = A.chunked_attention(q, k, v, causal=True, doc_ids=doc, block_size=block)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = A.reference_attention(q32, k32, v32, causal=True, doc_ids=doc)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    return [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]


def kernel_name(q, k, v):
    """The kernel the blocks of chunked_attention run for these (B, T, heads, D) inputs."""
    if q.device.type != "cuda":
        return "CPU flash"
    return A._cuda_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.1,
                          True).name


# --- the candidates: attention functions of (q, k, v) shaped (B, T, heads, D), which step() ---
# --- turns into one timed forward+backward -------------------------------------------------

def sdpa_repeated(q, k, v):
    """The peer: one fused SDPA call over the whole sequence, K/V heads repeated beforehand."""
    kh, vh = (x.transpose(1, 2).repeat_interleave(H // KV, 1) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), kh, vh, is_causal=True).transpose(1, 2)


def sdpa_gqa(q, k, v):
    """The same letting the kernel handle GQA (enable_gqa=True)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)


def chunked(module, block_size):
    return lambda q, k, v: module.chunked_attention(q, k, v, block_size=block_size)


class RepeatedKVHeads:
    """Context: attention.py's CUDA block kernels get K/V heads repeated to the query heads (and
    their gradients summed back), as before GQA was left to the kernel."""

    def __enter__(self):
        self.forward, self.backward = A._fused_block_forward, A._fused_block_backward
        forward, backward = self.forward, self.backward

        def repeated_forward(q, k, v, scale, causal):
            return forward(q, A._repeat_kv_heads(k, q.shape[1]),
                           A._repeat_kv_heads(v, q.shape[1]), scale, causal)

        def repeated_backward(dout, q, k, v, out, lse, scale, causal):
            dq, dk, dv = backward(dout, q, A._repeat_kv_heads(k, q.shape[1]),
                                  A._repeat_kv_heads(v, q.shape[1]), out, lse, scale, causal)
            return dq, A._sum_kv_heads(dk, k.shape[1]), A._sum_kv_heads(dv, k.shape[1])

        A._fused_block_forward, A._fused_block_backward = repeated_forward, repeated_backward

    def __exit__(self, *exc):
        A._fused_block_forward, A._fused_block_backward = self.forward, self.backward


def step(attention_fn, context=nullcontext):
    """One forward+backward of attention_fn, all of it (the backward too) inside context()."""
    def forward_backward(q, k, v, dout):
        with context():
            torch.autograd.grad(attention_fn(q, k, v), (q, k, v), dout)
    return forward_backward


# --- timing ----------------------------------------------------------------------------------------

def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, q, k, v, dout, device, min_seconds=0.3):
    """Mean seconds of one forward+backward: one warm-up, then at least 3 calls and min_seconds."""
    synchronize(device)
    start = time.perf_counter()
    fn(q, k, v, dout)  # warm-up (cuDNN builds its graphs here)
    synchronize(device)
    first = time.perf_counter() - start
    repeats = max(3, min(50, int(min_seconds / max(first, 1e-6))))
    start = time.perf_counter()
    for _ in range(repeats):
        fn(q, k, v, dout)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_gib(fn, q, k, v, dout, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(q, k, v, dout)
    return torch.cuda.max_memory_allocated() / 2 ** 30


def inputs(device, T, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, T, H, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(1, T, KV, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(1, T, KV, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    dout = torch.randn(1, T, H, D, device=device, dtype=dtype, generator=g)
    return q, k, v, dout


def speed(device, T, candidates):
    """{name: (TFLOP/s, peak GiB or None)}; a candidate that fails reports its error instead."""
    q, k, v, dout = inputs(device, T)
    flops = 7 * T * T * H * D
    results = {}
    for name, fn in candidates.items():
        try:
            seconds = timed(fn, q, k, v, dout, device)
            peak = peak_gib(fn, q, k, v, dout, device) if name.startswith("chunked") else None
            results[name] = (flops / seconds / 1e12, peak)
        except Exception as error:  # one broken variant must not cost the rest of the run
            results[name] = (f"{type(error).__name__}: {str(error).splitlines()[0][:160]}", None)
    return results


# --- profile -----------------------------------------------------------------------------------

ATTENTION_KERNEL_WORDS = ("flash", "fmha", "sdpa", "cudnn", "attention")


def profile(device, T, candidates, row_limit):
    """Per candidate: GPU time in the attention kernels, in all other kernels, and the wall time
    of one forward+backward; then the kernels that take the most time."""
    q, k, v, dout = inputs(device, T)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, fn in candidates.items():
        fn(q, k, v, dout)  # warm-up outside the profile
        synchronize(device)
        with torch_profile(activities=activities) as prof:
            start = time.perf_counter()
            fn(q, k, v, dout)
            synchronize(device)
            wall_ms = (time.perf_counter() - start) * 1e3
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        attention_us = sum(e.self_device_time_total for e in kernels
                           if any(w in e.key.lower() for w in ATTENTION_KERNEL_WORDS))
        total_us = sum(e.self_device_time_total for e in kernels)
        print(f"\n  [{name}] T={T}: wall {wall_ms:.2f} ms (profiled), GPU kernels {total_us / 1e3:.2f} ms "
              f"= attention kernels {attention_us / 1e3:.2f} ms + other kernels "
              f"{(total_us - attention_us) / 1e3:.2f} ms; {len(kernels)} kernel names")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:row_limit]:
            print(f"    {e.self_device_time_total / 1e3:8.3f} ms  {e.count:5d} calls  {e.key[:110]}")


# --- main --------------------------------------------------------------------------------------

def load_baseline(path):
    spec = importlib.util.spec_from_file_location("attention_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default=None, help="comma-separated, e.g. 8192,131072")
    p.add_argument("--blocks", default=str(A.DEFAULT_BLOCK_SIZE),
                   help="block sizes of chunked_attention to time, the default first")
    p.add_argument("--baseline", default=None, help="an older attention.py to time beside")
    p.add_argument("--ablations", action="store_true",
                   help="also: forced onto FlashAttention-2; K/V heads repeated per kernel call")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--skip-exactness", action="store_true")
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}")

    if not a.skip_exactness:
        T, block = (512, 128) if a.quick else (4096, 1024)
        print(f"\n[exactness] chunked vs reference, T={T}, block {block}, 8 q heads / 2 kv heads, "
              f"causal")
        for dtype in (torch.float32, torch.bfloat16):
            probe = [torch.zeros(1, 64, h, 64, device=a.device, dtype=dtype) for h in (8, 2, 2)]
            for doc_mask in (False, True):
                try:
                    errs = exactness(a.device, dtype, T, block, doc_mask)
                except Exception as error:  # reported, and the speed part still runs
                    print(f"  {str(dtype):15s} doc_mask={doc_mask!s:5s} FAILED {error!r:.300}")
                    continue
                print(f"  {str(dtype):15s} {kernel_name(*probe):20s} doc_mask={doc_mask!s:5s} "
                      f"rel err out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  "
                      f"dv {errs[3]:.1e}")

    blocks = [int(b) for b in a.blocks.split(",")]
    candidates = {"SDPA, K/V repeated": step(sdpa_repeated), "SDPA, enable_gqa": step(sdpa_gqa)}
    for block in blocks:
        candidates[f"chunked, block {block}"] = step(chunked(A, block))
    if a.ablations and a.device == "cuda":
        candidates[f"chunked, block {blocks[0]}, forced FlashAttention-2"] = step(
            chunked(A, blocks[0]), lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        candidates[f"chunked, block {blocks[0]}, K/V heads repeated"] = step(
            chunked(A, blocks[0]), RepeatedKVHeads)
    if a.baseline:
        candidates[f"chunked BEFORE ({a.baseline}), block 4096"] = step(
            chunked(load_baseline(a.baseline), 4096))

    if a.profile:
        T = 1024 if a.quick else 8192
        print(f"\n[profile] one bf16 causal forward+backward, T={T}, {H} q heads, {KV} kv heads, "
              f"head_dim {D}")
        profile(a.device, T, candidates, row_limit=6)

    default_lengths = "1024,2048" if a.quick else "8192,32768,65536,131072"
    lengths = [int(t) for t in (a.lengths or default_lengths).split(",")]
    probe = [torch.zeros(1, 64, h, D, device=a.device, dtype=torch.bfloat16) for h in (H, KV, KV)]
    print(f"\n[speed] bf16 causal forward+backward, {H} q heads, {KV} kv heads, head_dim {D}, "
          f"batch 1; chunked blocks run {kernel_name(*probe)}; ratio against the faster SDPA")
    for T in lengths:
        results = speed(a.device, T, candidates)
        peers = [r[0] for n, r in results.items() if n.startswith("SDPA")
                 and isinstance(r[0], float)]
        peer = max(peers) if peers else float("nan")
        print(f"  T={T}:")
        for n, (tflops, peak) in results.items():
            if not isinstance(tflops, float):
                print(f"    {n:48s} FAILED {tflops}")
                continue
            memory = "" if peak is None else f", peak {peak:.2f} GiB"
            print(f"    {n:48s} {tflops:6.1f} TFLOP/s  {tflops / peer:.2f}x{memory}")


if __name__ == "__main__":
    main()
