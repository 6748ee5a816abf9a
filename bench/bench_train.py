"""train.py benchmarks on CPU, fp32, each a ratio against a peer or limit measured in the same run.

1. training tokens/s (forward, backward, AdamW step) of the tiny preset against transformers'
   LlamaForCausalLM + torch.optim.AdamW with the same config, length and batch;
2. MFU on CPU: our model FLOP/s (attention's quadratic term included) against a plain fp32 matmul's;
3. --plan against measurement: train.py's planned peak for the tiny model against the peak
   resident memory of a real `train.py` step, in a fresh process (minus what the process held
   before the model was built).

    python bench/bench_train.py [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import train  # noqa: E402
from bench_model import tiny_and_its_transformers_twin, tokens_per_second  # noqa: E402


def step_rate(model_step, optimizer, tokens: int, repeats: int) -> float:
    def step():
        model_step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tokens_per_second(step, tokens, repeats)


def speed(seq: int, batch: int, repeats: int):
    ours, ref, args = tiny_and_its_transformers_twin(seq)
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ours_tps, ref_tps = [], []
    for _ in range(2):  # interleaved, so machine noise hits both alike
        ours_tps.append(step_rate(lambda: ours(tokens, labels=tokens), ours_opt, batch * seq, repeats))
        ref_tps.append(step_rate(lambda: ref(tokens, labels=tokens).loss, ref_opt, batch * seq, repeats))
    return max(ours_tps), max(ref_tps), M.flops_per_token(args, seq)


def matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def measured_peak(ctx: int, workdir: str) -> float:
    """MiB: a real train.py run in a fresh process; the peak resident memory its metrics report
    for the training steps, minus the resident memory once every module is imported."""
    corpus, cache = os.path.join(workdir, "corpus.jsonl"), os.path.join(workdir, "cache")
    code = f"""
import sys
sys.path.insert(0, {ROOT!r})
import train, data, tqdm, safetensors.torch  # everything the loop imports, before the baseline
import torch.distributed.checkpoint, torch.distributed.fsdp, torch.distributed._composable
data.build_token_file([{corpus!r}], data.load_tokenizer(None), {cache!r})  # tokenized before, reused
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]))  # KiB
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: only training counts from here
train.run(train.fill_defaults(train.build_parser().parse_args(
    ["--ctx", "{ctx}", "--batch", "1", "--steps", "2", "--out", {workdir!r}, "--cache", {cache!r},
     "--data", {corpus!r}, "--original-window", "512", "--dtype", "fp32",
     "--activation-checkpointing"])))
"""
    stdlib = os.path.dirname(os.__file__)
    with open(corpus, "w") as f:  # one document per standard-library module
        for name in sorted(os.listdir(stdlib))[:60]:
            if name.endswith(".py"):
                f.write(json.dumps({"text": open(os.path.join(stdlib, name), encoding="utf-8").read()}) + "\n")
    # glibc keeps freed buffers below its mmap threshold in its arenas, so the resident set would
    # measure the allocator's high-water mark rather than live tensors; with a low threshold large
    # buffers are mapped per allocation and returned on free (what max_memory_allocated is on GPU)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, env=env)
    baseline_kib = int(next(line for line in out.stdout.splitlines() if line.strip().isdigit()))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        peak_gib = max(json.loads(line)["peak_mem_gib"] for line in f)
    return peak_gib * 1024 - baseline_kib / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, fp32")

    seq, batch, repeats = (256, 2, 2) if a.quick else (1024, 4, 3)
    ours, ref, flops_per_token = speed(seq, batch, repeats)
    matmul = matmul_flops()
    print(f"\n[training step] tiny preset, batch {batch} x {seq}, forward + backward + AdamW")
    print(f"  ours {ours:8.0f} tok/s   transformers + AdamW {ref:8.0f} tok/s   ratio {ours / ref:.2f}x")
    print(f"  MFU on CPU: {ours * flops_per_token / 1e9:.1f} GFLOP/s of a plain 1024^3 matmul's "
          f"{matmul / 1e9:.1f} GFLOP/s = {ours * flops_per_token / matmul:.0%}")

    import tempfile
    print("\n[--plan vs measured] tiny preset, one process, fp32, batch 1, activation checkpointing on")
    for ctx in ([2048] if a.quick else [4096, 16384, 32768]):
        plan = sum(train.memory_plan(M.preset("tiny"), ctx, world=1, cp=1, compute_bytes=4).values()) / 2 ** 20
        with tempfile.TemporaryDirectory() as tmp:
            measured = measured_peak(ctx, tmp)
        print(f"  ctx {ctx:6d}: planned {plan:7.0f} MiB, measured {measured:7.0f} MiB, "
              f"planned/measured {plan / measured:.2f}")


if __name__ == "__main__":
    main()
