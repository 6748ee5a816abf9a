"""eval.py's memory at long context, on CPU: a needle-in-a-haystack prefill of the `tiny` model at
8K..64K tokens must grow linearly with the length (KV cache + one chunk), not quadratically.

    python bench/bench_eval.py                       (8K,16K,32K,64K; ~7 minutes on 2 cores)
    python bench/bench_eval.py --lengths 4K,8K --what prefill,ppl

Each case runs in a fresh process: it builds the model and a real NIAH sample (built-in corpus,
built-in tokenizer) of exactly that many tokens, then reports its peak resident set (ru_maxrss)
minus the resident set before the prefill, so cases do not see each other's allocations.
  prefill: Llama.generate(sample, 1 new token), chunks of 4096 tokens against the KV cache
           (what `eval.py niah` / `ruler` / `passkey` do);
  ppl:     model(tokens, labels, reduction="none") over the same tokens (what `eval.py ppl` does).
Printed per case: the peak, the KV cache's own size (the linear floor), their ratio, the peak's
growth against the shortest case next to the length's growth, and the peak's slope beyond the
shortest case in MiB per 1K tokens next to the KV cache's (linear: constant and close to it;
materialised attention scores would grow 64x from 8K to 64K and take 128 GiB at 64K).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import rope  # noqa: E402

MiB = 1 << 20


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def case(what: str, length: int, cache: str) -> dict:
    torch.manual_seed(0)
    args = M.preset("tiny")
    m = M.Llama(args)
    m.init_weights(seed=0)
    m.eval()
    tok = data.builtin_tokenizer()
    haystack = data.build_token_file(None, tok, cache, log=None)
    sample = E.make_sample("niah", tok, length, 0, depth=0.5, haystack=haystack, max_new_tokens=1)
    tokens = sample["tokens"]
    kv_mib = 2 * args.n_layers * len(tokens) * args.n_kv_heads * args.head_dim * 4 / MiB  # k and v, fp32
    before = rss_mib()
    start = time.perf_counter()
    if what == "prefill":
        m.generate(tokens, 1)
    else:
        with torch.no_grad():
            x = torch.tensor([tokens])
            m(x, labels=torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1), reduction="none")
    return {"what": what, "length": length, "peak_mib": rss_mib() - before, "kv_cache_mib": kv_mib,
            "seconds": time.perf_counter() - start}


def run_child(what: str, length: int, cache: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, str(length), "--cache", cache],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8K,16K,32K,64K")
    p.add_argument("--what", default="prefill", help="prefill, ppl or prefill,ppl")
    p.add_argument("--cache", default=".cache/tokens")
    p.add_argument("--child", nargs=2, metavar=("WHAT", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(case(args.child[0], int(args.child[1]), args.cache)))
        return
    lengths = [rope.parse_size(x) for x in args.lengths.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, tiny preset (fp32), NIAH sample, prefill chunk 4096")
    for what in args.what.split(","):
        print(f"\n{what}:")
        print(f"{'length':>8} {'peak MiB':>9} {'KV MiB':>8} {'peak/KV':>8} {'length x':>9} {'peak x':>7} "
              f"{'MiB/1K more':>12} {'KV MiB/1K':>10} {'s':>7}")
        first = None
        for length in lengths:
            r = run_child(what, length, args.cache)
            first = first or r
            # the slope beyond the shortest case: linear growth keeps it near the KV cache's own
            extra_k = (length - first["length"]) / 1024
            slope = f"{(r['peak_mib'] - first['peak_mib']) / extra_k:12.2f}" if extra_k else f"{'-':>12}"
            print(f"{E.format_length(length):>8} {r['peak_mib']:9.1f} {r['kv_cache_mib']:8.1f} "
                  f"{r['peak_mib'] / r['kv_cache_mib']:8.2f} {length / first['length']:9.1f} "
                  f"{r['peak_mib'] / first['peak_mib']:7.2f} {slope} {r['kv_cache_mib'] / (length / 1024):10.2f} "
                  f"{r['seconds']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
