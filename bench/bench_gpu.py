"""GPU checks of attention.py, for a machine with one CUDA GPU (run by bench/gpu_check.sh).

1. exactness on CUDA: chunked_attention (fused CUDA kernels per tile, document-mask tiles in the
   math path) against reference_attention, outputs and gradients, fp32 and bf16;
2. speed: chunked_attention forward+backward in bf16 at Llama 3.1 8B's attention shape (32 query
   heads, 8 KV heads, head_dim 128), causal, against PyTorch's fused SDPA on the same inputs in
   the same run, in TFLOP/s (causal forward+backward = 7 T^2 H D FLOPs).

    python bench/bench_gpu.py            (--quick: small sizes; --device cpu to try it anywhere)
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention import chunked_attention, reference_attention  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exactness(device, dtype, T, block, doc_mask):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, T, 8, 64, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, T, 2, 64, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, T, 2, 64, device=device, dtype=dtype, generator=g).requires_grad_()
    doc = (torch.arange(T, device=device) // (T // 3 + 7))[None] if doc_mask else None
    dout = torch.randn(1, T, 8, 64, device=device, dtype=dtype, generator=g)
    out = chunked_attention(q, k, v, causal=True, doc_ids=doc, block_size=block)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(q32, k32, v32, causal=True, doc_ids=doc)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
    return errs


def timed(fn, repeats):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def speed(device, T, repeats, H=32, KV=8, D=128, dtype=torch.bfloat16):
    q = torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, T, KV, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, KV, D, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(1, T, H, D, device=device, dtype=dtype)

    def ours():
        torch.autograd.grad(chunked_attention(q, k, v), (q, k, v), dout)

    def fused():  # the peer: one fused kernel over the whole sequence, K/V repeated to H heads
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh.repeat_interleave(H // KV, 1), vh.repeat_interleave(H // KV, 1),
                                             is_causal=True)
        torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

    flops = 7 * T * T * H * D
    t_ours, t_fused = timed(ours, repeats), timed(fused, repeats)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        ours()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = float("nan")
    return flops / t_ours / 1e12, flops / t_fused / 1e12, peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")

    T, block = (512, 128) if a.quick else (4096, 1024)
    print(f"\n[exactness] chunked vs reference, T={T}, block {block}, 8 q heads / 2 kv heads, causal")
    for dtype in (torch.float32, torch.bfloat16):
        for doc_mask in (False, True):
            errs = exactness(a.device, dtype, T, block, doc_mask)
            print(f"  {str(dtype):15s} doc_mask={doc_mask!s:5s} rel err out {errs[0]:.1e}  dq {errs[1]:.1e}  "
                  f"dk {errs[2]:.1e}  dv {errs[3]:.1e}")

    lengths = [1024, 2048] if a.quick else [8192, 32768, 65536, 131072]
    print("\n[speed] bf16 causal forward+backward, 32 q heads, 8 kv heads, head_dim 128, batch 1")
    for T in lengths:
        ours, fused, peak = speed(a.device, T, repeats=1 if a.quick else 3)
        print(f"  T={T:7d}: chunked {ours:6.1f} TFLOP/s, fused SDPA {fused:6.1f} TFLOP/s, "
              f"ratio {ours / fused:.2f}x, chunked peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
