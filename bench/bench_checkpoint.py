"""What checkpoints cost.

1. Verifying them: train.py records each shard file's size and CRC-32 when it saves, and checks them when it
   resumes. This saves a state of --gib GiB (fp32 tensors shaped like a layer's weights and AdamW moments) with
   torch.distributed.checkpoint as train.py does, then times file_sums on it, and prints the ratio of the two and
   what it means for Llama-3.1-8B (8.03e9 parameters x 12 bytes: fp32 weights and two AdamW moments, 89.7 GiB
   per checkpoint, spread over the ranks).
2. --start: reading the HF checkpoint at the start and exporting at the end. A model of --dim/--layers/--ffn
   written in the HF layout (bf16, as Llama ships), then `torchrun --nproc_per_node W train.py --model DIR`, one
   step of 512 tokens, for each W of --worlds. Per rank: the peak resident memory (ru_maxrss) once the model is
   built, sharded and filled ("loaded") and at the end, against its share (the memory plan's weights, gradients
   and AdamW / W and the step's own, plus what the process held before the model); the bytes of the
   checkpoint's files it read; rank 0's export in seconds per GB. --code DIR runs another tree's train.py
   (e.g. an older commit's, for a before/after).
   Bytes read: safetensors maps each file (mmap) and a tensor is a view of it, so /proc/self/io sees no read;
   the pages a rank touched are its mapping's resident size (/proc/self/smaps Rss), counted here just before
   each file is unmapped, page-cache hits included.

    python bench/bench_checkpoint.py --gib 2
    python bench/bench_checkpoint.py --start [--code DIR] [--worlds 1 2 4]
"""
import argparse, contextlib, json, os, resource, shutil, subprocess, sys, tempfile, time, warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("BENCH_CODE", ROOT))
import model as M  # noqa: E402
import rope  # noqa: E402
import train  # noqa: E402


def sums(args):
    import torch.distributed.checkpoint as dcp
    n = int(args.gib * 2 ** 30 / 4 / (4096 * 4096))  # 4096 x 4096 fp32 tensors, 64 MiB each
    state = {f"t{i}": torch.randn(4096, 4096) for i in range(max(n, 1))}
    folder = tempfile.mkdtemp(dir=args.dir)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=folder, no_dist=True)
        os.sync()
        save_s = time.perf_counter() - t0
        nbytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        t0 = time.perf_counter()
        train.file_sums(folder, train.Dist())
        sums_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder)
    gib = nbytes / 2 ** 30
    print(f"{gib:.2f} GiB: dcp.save + sync {save_s:.2f} s ({gib / save_s:.2f} GiB/s), "
          f"file_sums {sums_s:.2f} s ({gib / sums_s:.2f} GiB/s, files in the page cache as right after a save)")
    print(f"checksums / save = {sums_s / save_s:.2f}")
    for world in (8, 64):
        per_rank = 8.03e9 * 12 / 2 ** 30 / world
        print(f"Llama-3.1-8B on {world} ranks: {per_rank:.1f} GiB per rank, checksums ~{per_rank / (gib / sums_s):.1f} s "
              f"per save and per resume at this rate")



def mapped_bytes(path: str) -> int:  # resident bytes of this process's mappings of `path`
    total, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line: "start-end perms offset dev inode path"
                mine = line.rstrip("\n").endswith(path)
            elif mine and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def worker(train_args: list[str], report: str):
    """One rank under torchrun: train.py's own run, with each checkpoint file's touched pages and the export's time
    recorded, then this rank's figures written to report + rank.json."""
    import safetensors
    stats, real_open, real_build, real_export = {"read": 0}, safetensors.safe_open, train.build_model, train.export_hf

    @contextlib.contextmanager
    def counted_open(path, **kwargs):
        with real_open(path, **kwargs) as f:
            yield f
            stats["read"] += mapped_bytes(os.path.abspath(path))

    def measured_build(*a, **kw):  # the load's own peak, before any step
        model = real_build(*a, **kw)
        stats["load_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return model

    def timed_export(*a, **kw):
        start = time.perf_counter()
        real_export(*a, **kw)
        stats["export_s"] = time.perf_counter() - start

    safetensors.safe_open, train.build_model, train.export_hf = counted_open, measured_build, timed_export
    import torch.distributed.checkpoint, torch.distributed.fsdp, tqdm  # noqa: F401 (in the baseline)
    stats["before_model"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
    train.main(train_args)
    stats["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"{report}{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(stats, f)


def start(args):
    import data
    margs = M.ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=args.dim // 256,
                        ffn_dim=args.ffn, vocab_size=32768, max_seq_len=8192,
                        rope=rope.RopeSettings(theta=500000.0, original_max_position=8192))
    n, ctx = M.count_params(margs), 512
    work = tempfile.mkdtemp(dir=args.dir)
    try:
        model = M.Llama(margs)
        model.init_weights(seed=0)
        model.to(torch.bfloat16).save_pretrained(os.path.join(work, "model"), tokenizer=data.builtin_tokenizer())
        del model
        files = [f for f in os.listdir(os.path.join(work, "model")) if f.endswith(".safetensors")]
        ckpt = sum(os.path.getsize(os.path.join(work, "model", f)) for f in files)
        with open(os.path.join(work, "corpus.jsonl"), "w") as f:
            for i in range(200):
                f.write(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor sit amet " * 40}) + "\n")
        print(f"model: {n / 1e6:.0f}M parameters ({n * 4 / 1e9:.2f} GB fp32), checkpoint {ckpt / 1e9:.2f} GB bf16 "
              f"in {len(files)} file(s); code: {args.code}; one step of {ctx} tokens")
        for world in args.worlds:
            out, report = os.path.join(work, f"out{world}"), os.path.join(work, f"report{world}_")
            train_args = ["--model", os.path.join(work, "model"), "--data", os.path.join(work, "corpus.jsonl"),
                          "--out", out, "--cache", os.path.join(work, "cache"), "--ctx", str(ctx), "--original-window", "256", "--batch",
                          str(world), "--steps", "1", "--dtype", "fp32", "--no-activation-checkpointing"]
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
            env = {**os.environ, "BENCH_CODE": args.code, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([*launcher, __file__, "--worker", report, "--", *train_args], env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
            plan = train.memory_plan(margs, ctx, world, 1, compute_bytes=4, activation_checkpointing=False)
            ranks = [json.load(open(f"{report}{r}.json")) for r in range(world)]
            print(f"\n[{world} process{'es' if world > 1 else ''}] weights + grads + AdamW / {world} = "
                  f"{16 * n / world / 1e9:.2f} GB; the step's own (plan) {(sum(plan.values()) - 16 * n / world) / 1e9:.2f} GB")
            for r, s in enumerate(ranks):
                share = sum(plan.values()) + s["before_model"]
                print(f"  rank {r}: peak {s['peak'] / 1e9:5.2f} GB (loaded: {s['load_peak'] / 1e9:5.2f} GB), share "
                      f"{share / 1e9:5.2f} GB (incl. {s['before_model'] / 1e9:.2f} GB before the model): "
                      f"{s['peak'] / share:.2f}x; checkpoint bytes read {s['read'] / 1e9:.2f} GB")
            total = sum(s["read"] for s in ranks)
            print(f"  all ranks read {total / 1e9:.2f} GB = {total / ckpt:.2f} checkpoints; export on rank 0: "
                  f"{ranks[0]['export_s']:.1f} s for {n * 4 / 1e9:.2f} GB fp32 = {ranks[0]['export_s'] / (n * 4 / 1e9):.1f} s/GB")
    finally:
        shutil.rmtree(work)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--start", action="store_true", help="part 2: the HF checkpoint's read and the export")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2688)
    p.add_argument("--code", default=ROOT, help="the tree whose train.py runs (default: this one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(rest[1:] if rest[:1] == ["--"] else rest, args.worker)
    return start(args) if args.start else sums(args)


if __name__ == "__main__":
    main()
