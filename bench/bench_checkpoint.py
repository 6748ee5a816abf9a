"""What verifying checkpoints costs: train.py records each shard file's size and CRC-32 when it saves,
and checks them when it resumes. This saves a state of --gib GiB (fp32 tensors shaped like a layer's
weights and AdamW moments) with torch.distributed.checkpoint as train.py does, then times file_sums on
it, and prints the ratio of the two and what it means for Llama-3.1-8B (8.03e9 parameters x 12 bytes:
fp32 weights and two AdamW moments, 89.7 GiB per checkpoint, spread over the ranks).

    python bench/bench_checkpoint.py --gib 2
"""
import argparse, os, shutil, sys, tempfile, time, warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
