"""data.py benchmarks, as ratios against peers measured in the same run.

1. tokenization: build_token_file (read JSONL from disk, parse, encode on all cores, write the
   uint32 token file) against the `tokenizers` library's own batch encoding of the same texts,
   already in memory, in the same batches. Target >= 0.8x. Text: this Python's standard library.
   Tokenizers: a byte-level BPE with Llama 3's pre-tokenizer trained here on that text (or a real
   model directory with --tokenizer), and the built-in byte-level tokenizer.
2. packing: PackedDataset building 4M-token sequences from a synthetic token file larger than
   1 GiB (written to /tmp, deleted afterwards) against plain memory copies (np.copyto): the four
   int64 tensors of ds[i] / the loader against copying those 32 bytes a token, into a preallocated
   and into a fresh array; also shown: copying the ctx+1 uint32 tokens, from memory and in cache.
   Memory: runs in a fresh process and reports the peak resident set beyond the sequence itself
   (target < ~100 MB).
3. containers: build_token_file from the same documents as JSONL, Parquet (row groups of 256 documents)
   and .jsonl.zst, each against the library's batch encoding in the same run (target >= 0.9x each;
   the token files must be equal). Memory: peak RSS (VmHWM, a fresh process, byte-level tokenizer) while
   reading Parquet files of 10, 20 and 40 row groups of ~8 MiB of text: flat in the file's size.

    python bench/bench_data.py                     (--quick: 4 MiB of text, a 256 MiB token file)
    python bench/bench_data.py --parts containers --container-mib 16
"""
import argparse
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

MiB = 1 << 20
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(fns, repeats):
    """Best time of each fn over interleaved repeats: a shared machine's load drifts, and all see it alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(best_of(1, fn))
    return [min(t) for t in times]


# ----------------------------------------------------------------------------------------------
# 1. tokenization

def stdlib_texts(max_bytes):
    texts, total = [], 0
    for path in data.builtin_corpus_files():
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            continue
        if text:
            texts.append(text)
            total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return texts, total


def train_bpe(texts, out_dir, vocab_size=16384):
    """A Llama-3-shaped tokenizer (regex split, byte level, BPE, the special tokens)."""
    import tokenizers
    from tokenizers import pre_tokenizers
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in data.LLAMA3_SPECIAL_TOKENS])
    os.makedirs(out_dir, exist_ok=True)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def library_batches(texts):
    """The same batches build_token_file hands the encoder (<= 8M characters or 4096 documents)."""
    batches, batch, chars = [], [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= 8_000_000 or len(batch) >= 4096:
            batches.append(batch)
            batch, chars = [], 0
    if batch:
        batches.append(batch)
    return batches


def bench_tokenization(name, tok, texts, n_bytes, workdir, repeats):
    jsonl = os.path.join(workdir, "corpus.jsonl")
    if not os.path.exists(jsonl):
        with open(jsonl, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    backend = tok._backend
    batches = library_batches(texts)

    def library_encode():
        for batch in batches:
            backend.encode_batch_fast(batch, add_special_tokens=False)

    def library_encode_ids():
        for batch in batches:
            [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]

    def ours():
        cache = tempfile.mkdtemp(dir=workdir)
        data.build_token_file([jsonl], tok, cache, log=None)
        shutil.rmtree(cache)

    ours()  # warm the page cache and the tokenizer before timing
    t_lib, t_lib_ids, t_ours = interleaved_best([library_encode, library_encode_ids, ours], repeats)

    # correctness in the same run: the token file holds exactly the library's ids
    cache = tempfile.mkdtemp(dir=workdir)
    token_file = data.build_token_file([jsonl], tok, cache, log=None)
    expected = [i for batch in batches for e in backend.encode_batch_fast(batch, add_special_tokens=False)
                for i in e.ids]
    assert token_file.n_tokens == len(expected) and (token_file.tokens == np.asarray(expected)).all()
    n_tokens = token_file.n_tokens
    del token_file
    shutil.rmtree(cache)

    print(f"  {name}: {n_bytes / MiB:.1f} MiB of text -> {n_tokens / 1e6:.2f}M tokens")
    print(f"    tokenizers encode_batch_fast, in memory   {n_bytes / t_lib / MiB:8.2f} MiB/s")
    print(f"    ... and .ids lists                         {n_bytes / t_lib_ids / MiB:8.2f} MiB/s")
    print(f"    build_token_file, JSONL file -> token file {n_bytes / t_ours / MiB:8.2f} MiB/s")
    print(f"    ratio ours / library: {t_lib / t_ours:.2f}x  (vs library + .ids: {t_lib_ids / t_ours:.2f}x)")
    return {"tokenizer": name, "mib": n_bytes / MiB, "tokens": n_tokens,
            "library_mib_s": n_bytes / t_lib / MiB, "library_ids_mib_s": n_bytes / t_lib_ids / MiB,
            "ours_mib_s": n_bytes / t_ours / MiB, "ratio": t_lib / t_ours, "ratio_vs_ids": t_lib_ids / t_ours}


# ----------------------------------------------------------------------------------------------
# 2. packing

def write_synthetic_token_file(out_dir, n_tokens, seed=0):
    """Documents of log-normal length (median 8K tokens, clipped to [16, 2M]) of random ids."""
    rng = np.random.default_rng(seed)

    def batches():
        written = 0
        while written < n_tokens:
            lengths = np.clip(rng.lognormal(np.log(8192), 1.2, size=2048), 16, 2_000_000).astype(np.int64)
            lengths = lengths[np.cumsum(lengths) <= n_tokens - written] if lengths.sum() > n_tokens - written else lengths
            if len(lengths) == 0:
                lengths = np.array([n_tokens - written])
            yield rng.integers(0, 128_000, size=int(lengths.sum()), dtype=np.uint32), lengths, ["synthetic"] * len(lengths)
            written += int(lengths.sum())
    return data.write_token_file(out_dir, batches(), lambda: {"synthetic": True})


def packing_child(token_dir, ctx, max_sequences):
    """Runs in a fresh process: RSS before, peak RSS while packing every sequence, throughput."""
    import torch
    token_file = data.TokenFile(token_dir)
    order = data.sample_by_length(token_file, token_file.n_tokens, seed=0, log=None)
    sep = data.separator_ids(data.builtin_tokenizer(), "<s>")
    dataset = data.PackedDataset(token_file, order, ctx, sep)
    n = min(len(dataset), max_sequences)
    baseline = rss_bytes()  # before the first read: the cached positions (0, 1, ...) count as overhead
    peak = baseline
    sequence_bytes = 0
    start = time.perf_counter()
    for i in range(n):
        item = dataset[i]
        sequence_bytes = sum(t.numel() * t.element_size() for t in item.values())
        peak = max(peak, rss_bytes())
        del item
    elapsed = time.perf_counter() - start
    peak = max(peak, rss_bytes("VmHWM"))  # the kernel's own peak catches what sampling missed
    packed_tokens_s = n * ctx / elapsed

    # the peers: a plain memory copy of the same bytes, in memory, after the RSS measurement
    src = np.random.default_rng(0).integers(0, 128_000, size=ctx + 1, dtype=np.uint32)
    dst = np.empty_like(src)
    t_copy = best_of(5, lambda: np.copyto(dst, src))  # copies 16 MB that stay in the CPU's cache
    # ... and from memory, like the packer's reads: slices of a 512 MiB array, far beyond any cache
    pool = np.ones(128 * MiB, dtype=np.uint32)
    slices = [pool[j * (ctx + 1) : (j + 1) * (ctx + 1)] for j in range(len(pool) // (ctx + 1))]
    t_copy_cold = best_of(3, lambda: [np.copyto(dst, s) for s in slices]) / len(slices)
    del pool, slices
    out_src = np.zeros(4 * ctx, dtype=np.int64)  # the four int64 tensors a sequence is made of
    out_dst = np.empty_like(out_src)
    t_copy_out = best_of(5, lambda: np.copyto(out_dst, out_src))
    t_copy_out_fresh = best_of(5, lambda: out_src.copy())

    # what training calls: the loader, whole sequences and one rank's zigzag shard of 8
    t_loader = best_of(5, lambda: next(iter(data.Loader(dataset, 1))))
    t_shard = best_of(5, lambda: next(iter(data.Loader(dataset, 1, cp_rank=0, cp_size=8))))
    return {
        "file_gib": token_file.n_tokens * 4 / (1 << 30), "ctx": ctx, "sequences": n,
        "rss_baseline_mib": baseline / MiB, "rss_peak_mib": peak / MiB, "sequence_mib": sequence_bytes / MiB,
        "rss_beyond_sequence_mib": (peak - baseline - sequence_bytes) / MiB,
        "copy_cold_tokens_s": (ctx + 1) / t_copy_cold,
        "packing_tokens_s": packed_tokens_s, "loader_tokens_s": ctx / t_loader,
        "copy_tokens_s": (ctx + 1) / t_copy, "copy_output_tokens_s": ctx / t_copy_out,
        "copy_output_fresh_tokens_s": ctx / t_copy_out_fresh,
        "ratio_vs_token_copy": packed_tokens_s / ((ctx + 1) / t_copy),
        "ratio_vs_output_copy": packed_tokens_s / (ctx / t_copy_out),
        "ratio_vs_output_copy_fresh": packed_tokens_s / (ctx / t_copy_out_fresh),
        "loader_ratio_vs_output_copy": t_copy_out / t_loader,
        "loader_ms": t_loader * 1e3, "cp8_shard_ms": t_shard * 1e3,
    }


def bench_packing(file_tokens, ctx, max_sequences):
    tmp = tempfile.mkdtemp(prefix="bench_data_", dir="/tmp")
    try:
        start = time.perf_counter()
        token_file = write_synthetic_token_file(os.path.join(tmp, "tokens"), file_tokens)
        print(f"  wrote a synthetic {token_file.n_tokens * 4 / (1 << 30):.2f} GiB token file "
              f"({token_file.n_docs} documents) in {time.perf_counter() - start:.1f} s")
        out = subprocess.run([sys.executable, __file__, "--packing-child", token_file.path, "--ctx", str(ctx),
                              "--max-sequences", str(max_sequences)], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp)
    r = result
    print(f"  {r['sequences']} sequences of {ctx:,} tokens from a {r['file_gib']:.2f} GiB file")
    print(f"    np.copyto, ctx+1 uint32 tokens, from memory    {r['copy_cold_tokens_s'] / 1e6:8.1f} M tokens/s")
    print(f"    np.copyto, ctx+1 uint32 tokens, in cache       {r['copy_tokens_s'] / 1e6:8.1f} M tokens/s")
    print(f"    PackedDataset[i] (fresh tensors)               {r['packing_tokens_s'] / 1e6:8.1f} M tokens/s")
    print(f"    Loader, batch 1 (fresh batch)                  {r['loader_tokens_s'] / 1e6:8.1f} M tokens/s")
    print(f"    np.copyto, the 4 int64 outputs                 {r['copy_output_tokens_s'] / 1e6:8.1f} M tokens/s"
          f"   PackedDataset ratio {r['ratio_vs_output_copy']:.2f}x, Loader {r['loader_ratio_vs_output_copy']:.2f}x")
    print(f"    .copy() of the 4 int64 outputs (fresh)         {r['copy_output_fresh_tokens_s'] / 1e6:8.1f} M tokens/s"
          f"   PackedDataset ratio {r['ratio_vs_output_copy_fresh']:.2f}x")
    print(f"    cp=8: one rank's zigzag shard {r['cp8_shard_ms']:.1f} ms vs the whole sequence {r['loader_ms']:.1f} ms")
    print(f"    resident memory: baseline {r['rss_baseline_mib']:.0f} MiB, peak {r['rss_peak_mib']:.0f} MiB, "
          f"sequence {r['sequence_mib']:.0f} MiB -> {r['rss_beyond_sequence_mib']:.0f} MiB beyond the sequence")
    return result


# ----------------------------------------------------------------------------------------------
# 3. containers: Parquet and .jsonl.zst against JSONL and the library

def cycled_texts(max_bytes):
    """This Python's standard library sources, repeated (each copy numbered) until max_bytes of text."""
    base, base_bytes = stdlib_texts(float("inf"))
    texts, total = [], 0
    for copy in itertools.count():
        for text in base:
            texts.append(f"# copy {copy}\n" + text)
            total += len(texts[-1].encode("utf-8"))
            if total >= max_bytes:
                return texts, total


def write_containers(texts, workdir, row_group_docs):
    """The same documents as corpus.jsonl, corpus.parquet (row groups of row_group_docs) and corpus.jsonl.zst,
    each in its own folder (the domain is the file's name, so the token files are comparable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    paths = {ext: os.path.join(workdir, ext, f"corpus.{ext}") for ext in ("jsonl", "parquet", "jsonl.zst")}
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    with open(paths["jsonl"], "rb") as src, zstandard.open(paths["jsonl.zst"], "wb") as dst:
        shutil.copyfileobj(src, dst)
    with pq.ParquetWriter(paths["parquet"], pa.schema([("text", pa.string())])) as writer:
        for start in range(0, len(texts), row_group_docs):
            writer.write_table(pa.table({"text": texts[start : start + row_group_docs]}))
    return paths


def bench_containers(name, tok, texts, n_bytes, workdir, repeats):
    paths = write_containers(texts, workdir, row_group_docs=256)
    backend, batches = tok._backend, library_batches(texts)

    def library_encode():
        for batch in batches:
            backend.encode_batch_fast(batch, add_special_tokens=False)

    def build(path):
        cache = tempfile.mkdtemp(dir=workdir)
        data.build_token_file([path], tok, cache, log=None)
        shutil.rmtree(cache)

    readers = [functools.partial(build, path) for path in paths.values()]
    for reader in readers:
        reader()  # warm the page cache, the tokenizer and the imports
    t_lib, *t_ours = interleaved_best([library_encode] + readers, repeats)
    token_files = [data.build_token_file([path], tok, tempfile.mkdtemp(dir=workdir), log=None)
                   for path in paths.values()]
    for tf in token_files[1:]:  # the same token file from every container, in the same run
        assert (tf.tokens == token_files[0].tokens).all() and (tf.lengths == token_files[0].lengths).all()
    sizes = {ext: os.path.getsize(path) / MiB for ext, path in paths.items()}
    print(f"  {name}: {n_bytes / MiB:.1f} MiB of text, {len(texts)} documents -> {token_files[0].n_tokens / 1e6:.2f}M "
          f"tokens; files: " + ", ".join(f"{ext} {mib:.1f} MiB" for ext, mib in sizes.items()))
    print(f"    tokenizers encode_batch_fast, in memory     {n_bytes / t_lib / MiB:8.2f} MiB/s")
    result = {"tokenizer": name, "mib": n_bytes / MiB, "docs": len(texts), "library_mib_s": n_bytes / t_lib / MiB}
    for ext, t in zip(paths, t_ours):
        print(f"    build_token_file from {ext:<10}            {n_bytes / t / MiB:8.2f} MiB/s   ratio {t_lib / t:.2f}x")
        result[ext] = {"mib_s": n_bytes / t / MiB, "ratio": t_lib / t, "file_mib": sizes[ext]}
    return result


def parquet_memory_child(path):
    """Runs in a fresh process: peak resident memory (VmHWM) while tokenizing a Parquet file, byte-level."""
    cache = tempfile.mkdtemp(dir=os.path.dirname(path))
    baseline = rss_bytes()
    token_file = data.build_token_file([path], data.builtin_tokenizer(), cache, log=None)
    return {"rss_baseline_mib": baseline / MiB, "rss_peak_mib": rss_bytes("VmHWM") / MiB,
            "tokens": token_file.n_tokens}


def bench_parquet_memory(group_mib, group_counts):
    """Peak RSS while reading Parquet files of each count of row groups of ~group_mib MiB of text: flat when the
    reader holds one row group at a time (the largest file is many times its row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    base, _ = stdlib_texts(group_mib * MiB)  # one row group's documents
    tmp, results = tempfile.mkdtemp(prefix="bench_data_pq_", dir="/tmp"), []
    try:
        for n_groups in group_counts:
            path = os.path.join(tmp, f"g{n_groups}", "corpus.parquet")
            os.makedirs(os.path.dirname(path))
            with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
                for g in range(n_groups):  # each group's documents made distinct
                    writer.write_table(pa.table({"text": [f"# group {g}\n" + t for t in base]}))
            out = subprocess.run([sys.executable, __file__, "--parquet-memory-child", path], check=True,
                                 capture_output=True, text=True)
            r = {**json.loads(out.stdout.strip().splitlines()[-1]), "file_mib": os.path.getsize(path) / MiB,
                 "groups": n_groups, "text_mib": n_groups * sum(len(t.encode("utf-8")) for t in base) / MiB}
            print(f"    {n_groups:3d} row groups, {r['text_mib']:6.1f} MiB of text ({r['file_mib']:.1f} MiB file): "
                  f"peak RSS {r['rss_peak_mib']:.0f} MiB (baseline {r['rss_baseline_mib']:.0f} MiB)")
            results.append(r)
            shutil.rmtree(os.path.dirname(path))
    finally:
        shutil.rmtree(tmp)
    small, large = results[0], results[-1]
    extra_text, extra_rss = large["text_mib"] - small["text_mib"], large["rss_peak_mib"] - small["rss_peak_mib"]
    print(f"    largest vs smallest file: {extra_rss:+.0f} MiB of peak RSS for {extra_text:.0f} MiB more text "
          f"({extra_rss / extra_text:.3f} MiB per MiB; reading it all into memory: >= 1)")
    return {"runs": results, "rss_growth_mib_per_text_mib": extra_rss / extra_text}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokenizer", help="a model directory whose tokenizer.json to benchmark instead of the trained BPE")
    parser.add_argument("--packing-child", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=int, default=4 * MiB)
    parser.add_argument("--max-sequences", type=int, default=1000)
    parser.add_argument("--container-mib", type=float, default=16,
                        help="MiB of text tokenized from each container (the issue's ~200 takes an hour here)")
    parser.add_argument("--parts", default="tokenize,packing,containers")
    parser.add_argument("--parquet-memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.packing_child:
        print(json.dumps(packing_child(args.packing_child, args.ctx, args.max_sequences)))
        return
    if args.parquet_memory_child:
        print(json.dumps(parquet_memory_child(args.parquet_memory_child)))
        return

    parts = set(args.parts.split(","))
    print(f"machine: {os.cpu_count()} CPUs; {data.tokenizers.__version__=}; numpy {np.__version__}")
    text_bytes = 4 * MiB if args.quick else 8 * MiB
    texts, n_bytes = stdlib_texts(text_bytes)
    workdir = tempfile.mkdtemp(prefix="bench_data_tok_")
    results, repeats = {}, 2 if args.quick else 3
    try:
        if parts & {"tokenize", "containers"}:
            if args.tokenizer:
                bpe, name = data.load_tokenizer(args.tokenizer), args.tokenizer
            else:
                start = time.perf_counter()
                bpe = data.load_tokenizer(train_bpe(texts[: len(texts) // 4], os.path.join(workdir, "bpe")))
                name = f"BPE trained here (vocab {bpe.vocab_size})"
                print(f"  trained {name} in {time.perf_counter() - start:.1f} s")
        if "tokenize" in parts:
            print("1. tokenization")
            results["tokenize_bpe"] = bench_tokenization(name, bpe, texts, n_bytes, workdir, repeats)
            results["tokenize_builtin"] = bench_tokenization("built-in byte-level", data.builtin_tokenizer(), texts,
                                                             n_bytes, workdir, repeats)
        if "packing" in parts:
            print("2. packing")
            file_tokens = (256 * MiB if args.quick else int(1.1 * (1 << 30))) // 4
            results["packing"] = bench_packing(file_tokens, args.ctx, args.max_sequences)
        if "containers" in parts:
            print("3. containers: JSONL, Parquet, .jsonl.zst")
            big, big_bytes = cycled_texts((4 if args.quick else args.container_mib) * MiB)
            results["containers"] = bench_containers(name, bpe, big, big_bytes, os.path.join(workdir, "c"), repeats)
            print("  memory: Parquet files of 10, 20 and 40 row groups of ~8 MiB of text each")
            results["parquet_memory"] = bench_parquet_memory(8, (5, 10) if args.quick else (10, 20, 40))
    finally:
        shutil.rmtree(workdir)
    summary = {}
    if "tokenize" in parts:
        summary.update(tokenize_ratio_bpe=round(results["tokenize_bpe"]["ratio"], 2),
                       tokenize_ratio_builtin=round(results["tokenize_builtin"]["ratio"], 2))
    if "packing" in parts:
        summary.update(packing_ratio_vs_output_copy=round(results["packing"]["ratio_vs_output_copy"], 2),
                       loader_ratio_vs_output_copy=round(results["packing"]["loader_ratio_vs_output_copy"], 2),
                       rss_beyond_sequence_mib=round(results["packing"]["rss_beyond_sequence_mib"], 1))
    if "containers" in parts:
        summary.update({f"{ext}_ratio": round(results["containers"][ext]["ratio"], 2)
                        for ext in ("jsonl", "parquet", "jsonl.zst")},
                       parquet_rss_peak_mib=[round(r["rss_peak_mib"]) for r in results["parquet_memory"]["runs"]])
    print("summary: " + json.dumps(summary))


if __name__ == "__main__":
    main()
