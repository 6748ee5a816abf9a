"""model.py benchmarks on CPU, fp32, ratios against peers measured in the same run.

1. loss memory: our chunked loss vs full logits + F.cross_entropy (Llama 3's vocabulary);
2. the tiny preset's loss forward+backward at 8K..32K tokens: peak memory grows linearly;
3. speed: forward+backward tokens/s against transformers' LlamaForCausalLM, same config/length.

    python bench/bench_model.py            (add --quick for a short run)

Each memory case runs in a fresh process and reports its peak resident set (ru_maxrss) minus the
resident set before the case started, so cases do not see each other's allocations.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

MiB = 1 << 20


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_case(case: str, seq: int) -> dict:
    torch.manual_seed(0)
    if case in ("chunked_loss", "full_logits"):  # one layer, Llama 3's vocabulary
        args = M.ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=512)
    else:
        args = M.preset("tiny")
    m = M.Llama(args)
    m.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (1, seq))
    labels = torch.randint(0, args.vocab_size, (1, seq))
    before = rss_mib()
    start = time.perf_counter()
    if case == "full_logits":
        loss = F.cross_entropy(m(tokens).reshape(-1, args.vocab_size), labels.reshape(-1))
    else:
        loss = m(tokens, labels=labels)
    loss.backward()
    return {"case": case, "seq": seq, "peak_mib": rss_mib() - before, "seconds": time.perf_counter() - start}


def run_child(case: str, seq: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", case, str(seq)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tokens_per_second(step, tokens: int, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return tokens * repeats / (time.perf_counter() - start)


def tiny_and_its_transformers_twin(seq: int):
    """Our tiny preset and transformers' LlamaForCausalLM of the same configuration."""
    from transformers import LlamaConfig, LlamaForCausalLM
    args = M.preset("tiny")
    ours = M.Llama(args)
    ours.init_weights(seed=0)
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=seq, rope_theta=args.rope.theta, attn_implementation="sdpa"))
    return ours, ref, args


def speed_vs_transformers(seq: int, batch: int, repeats: int) -> tuple[float, float]:
    ours, ref, args = tiny_and_its_transformers_twin(seq)
    tokens = torch.randint(0, args.vocab_size, (batch, seq))

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(tokens, labels=tokens).backward()

    def ref_step():
        ref.zero_grad(set_to_none=True)
        ref(tokens, labels=tokens).loss.backward()  # HF shifts labels itself; same work

    ours_tps, ref_tps = [], []
    for _ in range(2):  # interleave, so machine noise hits both alike
        ours_tps.append(tokens_per_second(ours_step, batch * seq, repeats))
        ref_tps.append(tokens_per_second(ref_step, batch * seq, repeats))
    return max(ours_tps), max(ref_tps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(memory_case(a.child[0], int(a.child[1]))))
        return
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, fp32")

    seq = 1024 if a.quick else 4096
    full, chunked = run_child("full_logits", seq), run_child("chunked_loss", seq)
    print(f"\n[loss memory] 1 layer, vocab 128256, {seq} tokens, forward+backward")
    print(f"  full logits + F.cross_entropy: {full['peak_mib']:8.0f} MiB")
    print(f"  chunked loss (ours):           {chunked['peak_mib']:8.0f} MiB   "
          f"ratio {chunked['peak_mib'] / full['peak_mib']:.2f}x of full logits")

    lengths = [2048, 4096] if a.quick else [8192, 16384, 32768]
    print("\n[tiny preset, loss forward+backward, one sequence]")
    prev = None
    for t in lengths:
        r = run_child("tiny", t)
        growth = f"  x{r['peak_mib'] / prev:.2f} for 2x tokens" if prev else ""
        print(f"  {t:6d} tokens: peak {r['peak_mib']:7.0f} MiB, {r['seconds']:6.1f} s{growth}")
        prev = r["peak_mib"]

    seq, batch, repeats = (256, 2, 2) if a.quick else (1024, 4, 3)
    ours_tps, ref_tps = speed_vs_transformers(seq, batch, repeats)
    print(f"\n[speed] tiny preset, batch {batch} x {seq} tokens, forward+backward, fp32 CPU")
    print(f"  ours {ours_tps:8.0f} tok/s   transformers {ref_tps:8.0f} tok/s   ratio {ours_tps / ref_tps:.2f}x")


if __name__ == "__main__":
    main()
