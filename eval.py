"""Long-context evaluation: needle in a haystack, passkey, RULER, InfiniteBench, LV-Eval, perplexity by position.

    python eval.py niah    --model out/train/hf --lengths 1K,2K,4K --depths 0,0.25,0.5,0.75,1   (or passkey)
    python eval.py ruler   --model DIR --lengths 128K --haystack essays/ --squad SQUAD --hotpotqa HOTPOT [--prepare-only]
    python eval.py ruler   --model DIR --data RULER/synthetic/131072/data   (RULER's own validation.jsonl files)
    python eval.py infinitebench --model DIR --data InfiniteBench/ [--tasks passkey,kv_retrieval] [--prepare-only]
    python eval.py lveval  --model DIR --data LVEval/ [--lengths 16k,32k] [--tasks factrecall_en] [--score FILES]
    python eval.py ppl     --model DIR --lengths 4K --docs 4 [--data FILES]   (buckets of length/16)
    python eval.py jsonl   FILE.jsonl --model DIR [--max-len 128K]
    torchrun --nproc_per_node 8 eval.py niah --cp 8 --model DIR --lengths 1M   (one prompt, 8 GPUs)
    python eval.py plot    OUT_DIR        (redraws the PNG of an earlier run from its results.json)

A length counts the model's own tokens: the whole prompt (chat frame, haystack, needle, question,
answer prefix) plus the generation budget. Every run writes OUT/results.json: settings, one record
per item (prediction and scores, never the prompt) and the aggregate. Each item is also appended to
OUT/items.jsonl as soon as it is done: the same command, run again, continues where it stopped.
"""
import argparse, contextlib, hashlib, json, math, os, pathlib, random, sys, tempfile, time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import attention, data, longbench, rope, ruler, train
import model as M
from longbench import (generation_budget, make_jsonl_sample, normalize_answer, prompt_tokens, read_records, refuse,
                       token_f1)
from rope import UserError

FIT_TRIES = 6  # sizing renders per prompt: re-tokenising text at a cut moves its length by a few tokens
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# (head, needle, question, answer prefix). niah's needle is short: a 256-token byte-level prompt
# still has room for a haystack; passkey is Mohtashami & Jaggi (2023)'s, in repeated FILLER.
NIAH = ("Find the magic number hidden in this text.\n", "The magic number is {0}.", "What is the magic number?",
        "The magic number is")
PASSKEY = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
           "quiz you about the important information there.\n", "The pass key is {0}. Remember it. {0} is the pass key.",
           "What is the pass key?", "The pass key is")
def format_length(n: int) -> str:
    return next((f"{n // s}{x}" for x, s in (("M", 1 << 20), ("K", 1 << 10)) if n >= s and n % s == 0), str(n))

def derive_seed(*parts) -> int:  # one item's seed from everything that names it, independent of Python's hash()
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % (1 << 63)

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")

def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))

def string_match(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of references in the prediction, case-insensitive substrings."""
    return sum(a.lower() in prediction.lower() for a in answers) / len(answers)

BENCHES = ("infinitebench", "lveval")  # longbench.py: their own prompts, cuts, budgets and scorers
METRICS = {"exact_match": exact_match, "f1": token_f1, "string_match": string_match}
SCORES = {"niah": ["exact_match", "string_match"], "passkey": ["string_match", "exact_match"],
          "jsonl": ["exact_match", "f1"]}  # the scores of each task; the first is its headline

def take_haystack(token_file, tok, n: int, rng: random.Random) -> list[int]:
    order, out, i = list(range(token_file.n_docs)), [], 0
    rng.shuffle(order)
    while len(out) < n:
        out += token_file.doc(order[i % len(order)]).tolist() + tok.encode("\n\n")
        i += 1
    return out[:n]

def needle_context(tok, haystack: list[int], needle: str, depth: float) -> str:
    """The haystack's text with the needle its own line at fraction `depth` of it, moved by at most 0.5% of the
    haystack, or 8 tokens, to a word boundary: the needle splits no word."""
    at, radius = round(depth * len(haystack)), max(8, len(haystack) // 200)
    at = next((p for p in sorted(range(at - radius, at + radius + 1), key=lambda p: abs(p - at))
               if p in (0, len(haystack)) or 0 < p < len(haystack) and (tok.decode(haystack[p - 1:p])[-1:].isspace()
                                                                      or tok.decode(haystack[p:p + 1])[:1].isspace())), at)
    return tok.decode(haystack[:at]) + f"\n{needle}\n" + tok.decode(haystack[at:])

def make_sample(task: str, tok, length: int, seed: int, *, depth: float, haystack=None, chat: bool = True,
                max_new_tokens: int | None = None) -> dict:
    """A niah (7-digit number in the haystack TokenFile's documents) or passkey (5-digit key in FILLER) item of
    `length` tokens with its budget: n is corrected by what the prompt measures; the longest that fits is kept.
    With the token spans of the context and of the needle, and its depth: the haystack tokens before it / all."""
    rng = random.Random(seed)
    head, needle, question, answer_prefix = NIAH if task == "niah" else PASSKEY
    answer = str(rng.randint(1_000_000, 9_999_999) if task == "niah" else rng.randint(10_000, 99_999))
    needle, budget = needle.format(answer), max_new_tokens or generation_budget(tok, [answer])
    target, needed = length - budget, len(tok.encode(f"\n{needle}\n"))
    n = target - needed - len(prompt_tokens(tok, head + "\n" + question, answer_prefix, chat)[0])
    refuse([(n < 1, f"{task}: at length {format_length(length)} the prompt leaves {max(n + needed, 0)} tokens for "
                     f"the context but the needle needs {needed}; ask for a longer length")])
    unit = tok.encode(FILLER)  # every sizing try takes a prefix of the same stream
    stream = take_haystack(haystack, tok, target, rng) if task == "niah" else unit * (target // len(unit) + 1)
    best, last = None, None
    for _ in range(FIT_TRIES):
        context = needle_context(tok, stream[:n], needle, depth)
        tokens, start, lead = prompt_tokens(tok, head + context + "\n" + question, answer_prefix, chat)
        if len(tokens) <= target and (best is None or len(tokens) > len(best[0])):
            best = tokens, start, lead, context
        if len(tokens) == target or len(tokens) == last and best is not None:
            break
        n, last = n + target - len(tokens), len(tokens)
    tokens, start, lead, context = best
    at = len(head) + context.index(f"\n{needle}\n") + 1  # the needle's first character in the message
    c0, c1, a, b = [start + len(tok.encode(lead + (head + context)[:i]))
                    for i in (len(head), len(head) + len(context), at, at + len(needle))]
    return dict(task=task, depth=depth, seed=seed, length=length, max_new_tokens=budget, answers=[answer],
                needle=needle, tokens=tokens, context_span=[c0, c1], needle_span=[a, b],
                needle_depth=(a - c0) / max(c1 - c0 - (b - a), 1))

def load_model(path: str, dtype: str, d):
    """The model, whole on every rank (decoding needs it), its weights read once: rank 0 reads, then broadcasts."""
    if not os.path.isdir(path):
        raise UserError(f"model directory {path} does not exist; train one with `python train.py` or pass --model")
    dtype = torch.bfloat16 if dtype == "bf16" or dtype == "auto" and d.device.type == "cuda" else torch.float32
    model = M.Llama.from_pretrained(path, dtype, d.device, read_weights=d.is_main).eval()
    if d.world > 1:
        train.weights_from_rank0(model, model.state_dict() if d.is_main else None, d.device)
    vocab, own = model.args.vocab_size, os.path.isfile(os.path.join(path, "tokenizer.json"))
    refuse([(not own and vocab != data.BUILTIN_VOCAB_SIZE, f"{path} has no tokenizer.json and its vocabulary "
             f"({vocab}) is not the built-in tokenizer's ({data.BUILTIN_VOCAB_SIZE})")])
    tok = data.load_tokenizer(path) if own else data.builtin_tokenizer()
    refuse([(tok.vocab_size > vocab, f"the tokenizer of {path} has {tok.vocab_size} tokens but the model only {vocab}")])
    return model, tok

def answer(model, tok, s: dict, metrics: dict, d) -> dict:
    new = cp_generate(model, s["tokens"], s["max_new_tokens"], tok.stop_ids, d.cp_group) if d.world > 1 \
        else model.generate(s["tokens"], s["max_new_tokens"], stop_ids=tok.stop_ids)
    stopped = bool(new) and new[-1] in tok.stop_ids
    prediction = tok.decode(new[:-1] if stopped else new)
    return dict({k: v for k, v in s.items() if k != "tokens"}, prompt_tokens=len(s["tokens"]), prediction=prediction,
                stopped=stopped, scores={name: metric(prediction, s["answers"]) for name, metric in metrics.items()})

def resume(log, work, pairs, unit="sample", **bar) -> list[dict]:
    """Items of pairs (key, x) one at a time (a 1M-token prompt exists once): the log's, else work(x), appended."""
    done, append = log
    return [done[key] if key in done else append(dict(key=key, **work(x)))
            for key, x in tqdm(pairs, unit=unit, dynamic_ncols=True, delay=1, **bar)]

def check_cp_launch(cp: int, world: int):
    refuse([(cp < 1, f"--cp must be at least 1, got {cp}"),
            (world < cp, f"--cp {cp} needs {cp} processes but {world} were started; "
                         f"launch with torchrun --nproc_per_node {cp} eval.py ..."),
            (cp >= 1 and world % cp != 0, f"world size {world} is not divisible by --cp {cp}"),
            (world != cp, f"{world} processes were started for --cp {cp}, but evaluation splits each prompt over "
                          f"every process (there is no data-parallel evaluation); pass --cp {world}")])

@torch.no_grad()
def cp_prefill(model, prompt: list[int], group=None, room: int = 0):
    """Prefill `prompt` split over `group`, whose ring attention the model runs (cp_generate sets it): (the last
    token's logits (1, vocab) fp32, the same on every rank; this rank's KV caches with `room` slots left; its
    global positions (T,)). Padded at the END to a multiple of 2 x cp: under the causal mask no real token sees
    a later one. A rank keeps its zigzag shard: 1/cp of the KV cache (Llama 3.1 8B, bf16: 128 KiB per token)."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    n, weight, args = len(prompt), model.output.weight, model.args
    padded = -(-n // (2 * cp)) * 2 * cp
    positions = attention.zigzag_indices(padded, rank, cp).to(weight.device)  # (T,): chunks rank and 2cp-1-rank
    tokens = torch.tensor(prompt + [0] * (padded - n), device=weight.device)[positions][None]  # (1, T); any id pads
    caches = [M.KVCache(1, len(positions) + room, args.n_kv_heads, args.head_dim, weight.dtype, weight.device)
              for _ in range(args.n_layers)]
    h = model.hidden_states(tokens, positions[None], caches=caches)  # (1, T, dim)
    h_last = h[0, positions == n - 1].sum(0, keepdim=True)  # (1, dim): the last token's rank adds it, others 0
    dist.all_reduce(h_last, group=group)
    return model.output(h_last).float(), caches, positions

def cp_decode_attention(prompt_keys: torch.Tensor, group=None, block_size=attention.DEFAULT_BLOCK_SIZE):
    """One decode step's attention under cp. prompt_keys (T,) bool: which of this rank's first T cached keys
    are real (not pads); the decoded tokens' keys, cached on every rank, count on rank 0 only. Every rank
    merges all ranks' partial (out, lse) in rank order: the same output everywhere, bit for bit."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    def attend(q, k, v, causal=True, doc_ids=None):
        # q (1, 1, H, D): the new token, the same on every rank; k, v (1, Tk, KV, D): this rank's cache
        visible = torch.cat([prompt_keys, torch.full((k.shape[1] - len(prompt_keys),), rank == 0, device=k.device)])
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # head-major
        both = torch.zeros(*q.shape[:3], q.shape[3] + 1, device=q.device)  # (1, H, 1, D + 1) fp32: out, then lse
        out, lse = both[..., :-1], both[..., -1].fill_(float("-inf"))  # views; lse -inf: no key seen yet
        for start in range(0, k.shape[2], block_size):  # bounded memory for the scores
            cols = slice(start, start + block_size)
            attention.merge_partial_attention(out, lse, *attention.attention_block_forward(
                q, k[:, :, cols], v[:, :, cols], 1.0 / math.sqrt(q.shape[-1]), mask=visible[None, None, cols]))
        parts = [torch.empty_like(both) for _ in range(cp)]
        dist.all_gather(parts, both, group=group)  # one collective carries out and lse
        outs, lses = torch.stack(parts).split([q.shape[-1], 1], dim=-1)  # (cp, 1, H, 1, D), (cp, 1, H, 1, 1)
        return (torch.softmax(lses, dim=0) * outs).sum(0).transpose(1, 2).to(q.dtype)  # (1, 1, H, D)
    return attend

@torch.no_grad()
def cp_generate(model, prompt, max_new_tokens, stop_ids=(), group=None, block_size=attention.DEFAULT_BLOCK_SIZE):
    """Greedy continuation of one prompt split over the ranks of `group`: every rank returns the same new ids
    as Llama.generate on one device. Decoding is bound by the latency of 1 all_gather per layer per token."""
    n, device, out = len(prompt), model.output.weight.device, []
    model.set_attention(partial(attention.ring_attention, group=group, block_size=block_size))
    try:
        logits, caches, positions = cp_prefill(model, prompt, group, max_new_tokens)
        model.set_attention(cp_decode_attention(positions < n, group, block_size))
        for i in range(max_new_tokens):
            next_id = logits.argmax(-1)  # (1,)
            # rank 0's choice, one integer: ranks that disagreed on a near-tie would stop apart and hang
            dist.broadcast(next_id, group=group, group_src=0)
            out.append(int(next_id))
            if out[-1] in stop_ids or len(out) == max_new_tokens:
                break
            h = model.hidden_states(next_id.view(1, 1), torch.tensor([[n + i]], device=device), caches=caches)
            logits = model.output(h[:, -1]).float()  # (1, vocab)
    finally:
        model.set_attention(attention.chunked_attention)
    return out

def save_text(path: str, text: str):
    M.atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {path}")

def write_jsonl(path: str, records):  # one record a line, streamed: a benchmark's prompts can take gigabytes
    os.makedirs(os.path.dirname(path), exist_ok=True)
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    M.atomic_write(path, write)
    print(f"wrote {path}")

def item_log(out: str, settings: dict):
    """OUT/items.jsonl: the settings, then each item as soon as it is done. (its items by key, append(item) -> item)"""
    (path := pathlib.Path(out, "items.jsonl")).touch()
    os.truncate(path, path.read_bytes().rfind(b"\n") + 1)  # a crash mid-write leaves a line without its newline
    def append(item):
        with open(path, "a", encoding="utf-8") as f:  # closed, so flushed, before the next item starts
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
        return item
    lines = [r for _, r in data.read_jsonl(str(path))] or [append({"settings": settings})]
    old = lines[0].get("settings", {})
    differ = [f"{k} {old.get(k)!r} then, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    refuse([(differ, f"{path} holds another command's items ({'; '.join(differ)}); pass another --out or delete it")])
    return {it.get("key"): it for it in lines[1:]}, append

def write_results(args, items: list[dict], aggregate: dict, **more):
    result = dict(model=args.model, task=args.task, settings=vars(args), aggregate=aggregate, **more, items=items,
                  torch=torch.__version__, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    save_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=1, ensure_ascii=False))

def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])

def pyplot():  # pyplot drawing to files, or None without matplotlib
    with contextlib.suppress(ImportError):
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")
        return plt

def draw(out_dir: str, task: str, aggregate: dict):  # ppl by position, or a length x depth heatmap (red 0, green 1)
    if (plt := pyplot()) is None:
        return print(f"matplotlib is not installed, so no PNG was drawn; the numbers are in {out_dir}/results.json. "
                     f"Install it (pip install matplotlib) and run `python eval.py plot {out_dir}`.")
    if task == "ppl":
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([b["end"] for b in aggregate["buckets"]], [b["ppl"] for b in aggregate["buckets"]], marker="o")
        ax.set(xlabel="position (end of bucket, tokens)", ylabel="perplexity", title="perplexity by position")
    else:
        lengths, depths, scores = (aggregate["grid"][k] for k in ("lengths", "depths", "scores"))
        scores = np.array(scores, dtype=float)  # (depths, lengths)
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        fig.colorbar(ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto"), ax=ax)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{x:.0%}" for x in depths])
        ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=f"{task}: {aggregate['metric']}")
        for (row, col), value in np.ndenumerate(scores):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    path = os.path.join(out_dir, "ppl_by_position.png" if task == "ppl" else f"{task}_heatmap.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")

def plot_saved(out_dir: str):
    path = os.path.join(out_dir, "results.json")
    refuse([(not os.path.isfile(path), f"{path} does not exist; run an evaluation with --out {out_dir} first"),
            (pyplot() is None, "matplotlib is not installed, so nothing can be drawn (pip install matplotlib)")])
    result = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    refuse([(result["task"] not in ("niah", "passkey", "ppl"), f"{path} is a {result['task']} run, which has no picture")])
    draw(out_dir, result["task"], result["aggregate"])

def grid_aggregate(items: list[dict], lengths: list[int], depths: list[float], metric: str) -> dict:
    """niah, passkey: the mean of `metric` over the items (each counts once): in all, by length, by cell."""
    score = lambda keep: mean(it["scores"][metric] for it in items if keep(it))
    return {"score": score(lambda it: True), "metric": metric,
            "by_length": {format_length(n): score(lambda it: it["length"] == n) for n in lengths},
            "grid": {"lengths": lengths, "depths": depths,
                     "scores": [[score(lambda it: (it["length"], it["depth"]) == (n, x)) for n in lengths]
                                for x in depths]}}

def task_samples(args, tok):  # ((key, build() -> sample) of niah, passkey or jsonl, lazily; how many)
    options = dict(chat=args.chat, max_new_tokens=args.max_new_tokens)
    if args.task == "jsonl":
        records = read_records(args.path)
        return ((f"jsonl #{k} id {r['id']}", partial(make_jsonl_sample, tok, r, args.max_len, **options))
                for k, r in enumerate(records)), len(records)
    haystack = data.build_token_file(args.haystack, tok, args.cache) if args.task == "niah" else None
    cells = [(n, x, i) for n in args.lengths for x in args.depths for i in range(args.samples)]
    return ((f"{args.task} {n} depth {x} #{i}", partial(make_sample, args.task, tok, n, derive_seed(
        args.seed, args.task, n, x, i), depth=x, haystack=haystack, **options)) for n, x, i in cells), len(cells)

def ruler_records(args, tok):
    """(length, task, RULER's records, built lazily; or read from --data) per runnable task; the others are
    named once, with why."""
    if args.data:
        found, args.skipped, n = ruler.read_prepared(args.data[0], args.tasks)
        print("".join(f"skipped {task}: it {why}\n" for task, why in args.skipped.items()), end="")
        n = n or (args.lengths[0] if len(args.lengths) == 1 else None)
        refuse([(n is None, f"--data {args.data[0]}: no folder of its path names the length (RULER's "
                            f".../synthetic/131072/data does); pass it as --lengths 128K")])
        args.lengths = [n]
        return [(n, t, ruler.prepared_records(t, path)) for t, path in found.items()]
    sources = ruler.read_sources(args.haystack, args.squad, args.hotpotqa)
    args.skipped = {t: ruler.unavailable(t, sources) for t in args.tasks if ruler.unavailable(t, sources)}
    print("".join(f"skipped {task}: it {why}\n" for task, why in args.skipped.items()), end="")
    words = ruler.load_words()
    return [(n, t, ruler.build(t, tok, n, args.samples, derive_seed(args.seed, t, n), sources, words, args.chat))
            for n in args.lengths for t in args.tasks if t not in args.skipped]

def prepare_ruler(args, tok):
    """--prepare-only: RULER's own layout, OUT/<task>/validation.jsonl (OUT/<length>/<task>/ for
    several lengths), one record per line, and meta.json with the task's generation budget."""
    for n, task, records in ruler_records(args, tok):
        folder = os.path.join(args.out, *([format_length(n)] if len(args.lengths) > 1 else []), task)
        write_jsonl(os.path.join(folder, "validation.jsonl"), records)
        save_text(os.path.join(folder, "meta.json"), json.dumps(dict(
            task=task, max_seq_length=n, tokens_to_generate=ruler.budget(task), samples=args.samples,
            template="meta-llama3" if args.chat else "base")))

def ruler_table(items, lengths, tasks, skipped) -> dict:
    """The paper's table: per length, each task's score (its items' mean x 100, as RULER rounds it)
    and their average, each task counting once, over the tasks that ran (named in `tasks`)."""
    table = {}
    for n in lengths:
        scores = {t: round(100 * mean(it["scores"]["ruler"] for it in items if it["length"] == n and it["task"] == t), 2)
                  for t in tasks if t not in skipped}
        table[format_length(n)] = dict(scores, average=round(mean(scores.values()), 2), tasks=len(scores))
    return {"table": table, "skipped": skipped}

def run_ruler(args, model, tok, d, log):
    sample = lambda n, t, r: dict(tokens=ruler.encode(tok, r["input"] + r["answer_prefix"]), answers=r["outputs"],
                                  max_new_tokens=r["tokens_to_generate"], task=t, length=n, index=r["index"])
    done = lambda n, t: all(f"{t} {n} #{i}" in log[0] for i in range(args.samples))  # builds no record: slow at 1M
    runs = ruler_records(args, tok)  # --data's records are read, one at a time, however many its files hold
    samples = ((f"{t} {n} #{i}", partial(sample, n, t, r)) for n, t, records in runs
               for i, r in enumerate(records if args.data or not done(n, t) else [None] * args.samples))
    items = resume(log, lambda build: answer(model, tok, build(), {}, d), samples, desc="ruler",
                   total=None if args.data else len(runs) * args.samples)
    if not d.is_main:
        return None
    for it in items:  # string_match_all, or string_match_part for qa
        it["scores"] = {"ruler": ruler.item_score(it["task"], it["prediction"], it["answers"])}
    aggregate = ruler_table(items, args.lengths, args.tasks, args.skipped)
    write_results(args, items, aggregate)
    rows = [[n, *[row.get(t, "-") for t in args.tasks], f"{row['average']} ({row['tasks']} of {len(args.tasks)} tasks)"]
            for n, row in aggregate["table"].items()]
    save_text(os.path.join(args.out, "ruler.md"), markdown_table(["length", *args.tasks, "average"], rows) + "\n")
    print(markdown_table(["length", *args.tasks, "average"], rows))

def bench_samples(args, tok, task, path):  # (key, build() -> sample) of each record of one file, read one at a time
    return ((f"{task} line {it['line']}", partial(longbench.bench_sample, tok, it, args.task, args.max_len,
                                                  args.window, args.chat))
            for it in longbench.bench_records(args.task, task, path))

def prepare_bench(args, tok):
    """--prepare-only: the final prompts (cut, framed), OUT/<task>.jsonl, one record per item: id, input (the
    whole text, <|begin_of_text|> first), answers, max_new_tokens, truncated (LV-Eval: its gold_ans too)."""
    for task, path in longbench.find_files(args.task, args.data[0], args.tasks, args.levels):
        write_jsonl(os.path.join(args.out, f"{task}.jsonl"), (dict(
            id=s["id"], input=tok.decode(s["tokens"]), answers=s["answers"], max_new_tokens=s["max_new_tokens"],
            truncated=s["truncated"], **({"gold_ans": s["keywords"]} if args.task == "lveval" else {}))
            for s in (build() for _, build in bench_samples(args, tok, task, path))))

def run_bench(args, model, tok, d, log):
    samples = (pair for task, path in longbench.find_files(args.task, args.data[0], args.tasks, args.levels)
               for pair in bench_samples(args, tok, task, path))
    items = resume(log, lambda build: answer(model, tok, build(), {}, d), samples, desc=args.task)
    if d.is_main:
        finish_bench(args, items)
        for task in dict.fromkeys(it["task"] for it in items):  # the predictions in the benchmark's own files too
            name = f"preds_{task}.jsonl" if args.task == "infinitebench" else f"{task}.jsonl"
            write_jsonl(os.path.join(args.out, "preds", name),
                        [longbench.prediction_record(args.task, it) for it in items if it["task"] == task])

def finish_bench(args, items):  # scores, results.json and the table, from a model run or from --score's files
    for it in items:
        it["scores"] = {args.task: longbench.score(args.task, it["task"], it["prediction"], it["answers"],
                                                   it.get("keywords"))}
    aggregate, summary, header, rows = longbench.table(args.task, items)
    write_results(args, items, aggregate, summary=summary)
    save_text(os.path.join(args.out, f"{args.task}.md"), markdown_table(header, rows) + "\n")
    print(markdown_table(header, rows))

def run_generation(args, model, tok, d, log):
    samples, total = task_samples(args, tok)
    metrics = {name: METRICS[name] for name in SCORES[args.task]}
    items = resume(log, lambda build: answer(model, tok, build(), metrics, d), samples, desc=args.task, total=total)
    if not d.is_main:  # the other ranks of a cp launch only helped generate
        return None
    if args.task == "jsonl":  # each record counts once
        aggregate = dict({m: mean(it["scores"][m] for it in items) for m in metrics},
                         truncated=sum(it["truncated"] for it in items), records=len(items))
        write_results(args, items, aggregate)
        return print(f"jsonl: exact match {aggregate['exact_match']:.3f}, F1 {aggregate['f1']:.3f} over {len(items)} "
                     f"records ({aggregate['truncated']} cut in the middle to {format_length(args.max_len)} tokens)")
    aggregate = grid_aggregate(items, args.lengths, args.depths, SCORES[args.task][0])
    write_results(args, items, aggregate)
    draw(args.out, args.task, aggregate)
    print(f"{args.task}: mean {aggregate['metric']} {aggregate['score']:.3f}")

@torch.no_grad()
def run_ppl(args, model, tok, d, log):
    """Perplexity by position: target p (predicted from tokens 0..p-1) falls in bucket p // (length / 16). Losses
    are summed over every token of every sequence before dividing: token-weighted means, not means of means."""
    length, token_file = max(args.lengths), data.build_token_file(args.data, tok, args.cache)
    bucket, rng = max(1, length // 16), random.Random(args.seed)
    long_docs = np.flatnonzero(token_file.lengths >= length).tolist()
    chosen = rng.sample(long_docs, min(args.docs, len(long_docs)))
    sequences = [(f"corpus document {i}", token_file.doc(i)[:length].tolist()) for i in chosen] + [
        (f"joined documents #{k}", take_haystack(token_file, tok, length, rng)) for k in range(args.docs - len(chosen))]
    if len(chosen) < args.docs:
        print(f"note: only {len(long_docs)} documents reach {format_length(length)} tokens; the rest join shorter ones")
    n_buckets = math.ceil((length - 1) / bucket)
    def doc_losses(named):
        x = torch.tensor([named[1]], device=model.output.weight.device)  # (1, T): position t predicts token t + 1
        losses = model(x[:, :-1], labels=x[:, 1:], reduction="none")[0].double().cpu().numpy()  # (T - 1,)
        index = np.arange(1, x.shape[1]) // bucket
        sums, counts = np.bincount(index, losses, n_buckets), np.bincount(index, minlength=n_buckets)
        return {"doc": named[0], "tokens": x.shape[1], "loss": losses.mean(), "ppl": math.exp(losses.mean()),
                "bucket_loss": [s / c if c else None for s, c in zip(sums, counts)], "bucket_tokens": counts.tolist()}
    items = resume(log, doc_losses, [(f"ppl {length} {name}", (name, tokens)) for name, tokens in sequences],
                   desc="ppl", unit="doc")
    # each bucket's loss sum from the items' means: the same numbers whether an item is new or read back
    counts = np.sum([it["bucket_tokens"] for it in items], axis=0)  # (n_buckets,)
    sums = np.sum([[x * c if c else 0.0 for x, c in zip(it["bucket_loss"], it["bucket_tokens"])] for it in items], 0)
    buckets = [{"start": b * bucket, "end": min((b + 1) * bucket, length), "tokens": int(counts[b]),
                "loss": sums[b] / counts[b], "ppl": math.exp(sums[b] / counts[b])} for b in range(n_buckets) if counts[b]]
    loss = sums.sum() / counts.sum()
    aggregate = dict(loss=loss, ppl=math.exp(loss), length=length, docs=len(sequences), bucket=bucket, buckets=buckets)
    write_results(args, items, aggregate)
    save_text(os.path.join(args.out, "ppl_by_position.csv"), "bucket_start,bucket_end,tokens,loss,ppl\n" + "".join(
        f"{b['start']},{b['end']},{b['tokens']},{b['loss']:.6f},{b['ppl']:.4f}\n" for b in buckets))
    draw(args.out, "ppl", aggregate)
    print(markdown_table(["positions", "ppl"], [[f"{format_length(b['start'])}-{format_length(b['end'])}",
                                                 f"{b['ppl']:.3f}"] for b in buckets]))

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Long-context evaluation (see the module docstring).")
    p.add_argument("task", choices=["niah", "passkey", "ruler", *BENCHES, "ppl", "jsonl", "plot"])
    p.add_argument("path", nargs="?", help="jsonl: the records file; plot: the --out of an earlier run")
    p.add_argument("--model", default="out/train/hf", help="HF-layout model directory (default: train.py's export)")
    p.add_argument("--out", help="output directory (default: out/eval/TASK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--cache", default=".cache/tokens", help="where tokenized corpora are kept")
    p.add_argument("--cp", type=int, default=1, help="split each prompt over all N processes of torchrun")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="plain prompts, no chat template")
    p.add_argument("--max-new-tokens", type=int, help="generation budget, in the length (default: 2 x answer + 8)")
    p.add_argument("--lengths", help="e.g. 1K,4K,16K (default: window/8, /4, /2, window); ppl uses the largest; "
                                     "lveval: a subset of its levels 16k,32k,64k,128k,256k")
    p.add_argument("--samples", type=int, default=1, help="niah, passkey, ruler: items per cell (RULER's own: 500)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="niah, passkey: needle depths, 0 to 1")
    p.add_argument("--haystack", nargs="+", help="niah: text files, directories or globs (default: the built-in corpus); "
                                                 "ruler: essays (.txt files, folders, PaulGrahamEssays.json)")
    p.add_argument("--tasks", help="ruler, infinitebench: a comma-separated subset of the tasks; lveval: of its datasets")
    p.add_argument("--squad", help="ruler qa_1: SQuAD v2.0 dev JSON")
    p.add_argument("--hotpotqa", help="ruler qa_2: HotpotQA dev distractor JSON")
    p.add_argument("--prepare-only", action="store_true", help="ruler, infinitebench, lveval: write the prompts, load no weights")
    p.add_argument("--score", nargs="+", metavar="FILE", help="infinitebench, lveval: score prediction files, no model")
    p.add_argument("--docs", type=int, default=4, help="ppl: sequences to average over")
    p.add_argument("--data", nargs="+", help="ppl: documents (default: the built-in corpus); ruler, infinitebench, "
                                             "lveval: the folder of the benchmark's own files")
    p.add_argument("--max-len", help="jsonl: tokens of prompt + answer, e.g. 128K (default: the model's window); "
                                     "infinitebench, lveval: of the prompt, cut as the benchmark cuts it")
    return p

def fill_defaults(args, window: int):
    lveval = args.task == "lveval"  # its length levels name its files: they are not token counts
    args.levels = (args.lengths or ",".join(longbench.LV_LEVELS)).lower().split(",") if lveval else None
    args.window, args.lengths = window, sorted({rope.parse_size(x) for x in args.lengths.split(",")}
                                               if args.lengths and not lveval else {max(256, window // k) for k in (8, 4, 2, 1)})
    args.max_len = rope.parse_size(args.max_len) if args.max_len else None if args.task in BENCHES else window
    try:
        args.depths = [float(x) for x in args.depths.split(",")]
    except ValueError:
        raise UserError(f"cannot read --depths {args.depths}; depths are fractions like 0,0.5,1") from None
    known = {"infinitebench": longbench.IB_TASKS, "lveval": longbench.LV_DATASETS}.get(args.task, list(ruler.TASKS))
    args.tasks = (args.tasks or ",".join(known)).split(",")
    folder = args.data[0] if args.data else ""
    refuse([(args.task == "jsonl" and not args.path, "jsonl needs a file: python eval.py jsonl FILE.jsonl"),
            (not set(args.tasks) <= set(known), f"--tasks: unknown {set(args.tasks) - set(known)}; "
                                                f"{args.task}'s are {', '.join(known)}"),
            (lveval and not set(args.levels) <= set(longbench.LV_LEVELS),
             f"--lengths: LV-Eval's levels are {', '.join(longbench.LV_LEVELS)}, not {', '.join(args.levels or [])}"),
            ((args.task in BENCHES or args.task == "ruler" and args.data) and not os.path.isdir(folder),
             f"{args.task} --data needs one folder of the benchmark's own files; {folder or 'none'} is not one"),
            (args.lengths[0] < 2, f"length {args.lengths[0]} is too short to evaluate anything"),
            (any(not 0 <= x <= 1 for x in args.depths), "--depths must lie between 0 and 1"),
            *[(getattr(args, k) is not None and getattr(args, k) < 1, f"--{k.replace('_', '-')} must be at least 1")
              for k in ("samples", "docs", "max_new_tokens", "max_len")]])
    longest = args.max_len or 0 if args.task in ("jsonl", *BENCHES) else args.lengths[-1]
    if longest > window:
        print(f"warning: length {format_length(longest)} is beyond the model's window of {format_length(window)} "
              f"tokens (max_position_embeddings in its config.json); expect lower scores", file=sys.stderr)

def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # the path may follow the options
    world, d = int(os.environ.get("WORLD_SIZE", "1")), None
    reporting = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone prints and writes
    try:
        if args.task == "plot":
            return plot_saved(args.path or "") or 0
        if args.task == "ppl" and max(world, args.cp) > 1:
            raise UserError("ppl has no context-parallel path; run it as one process, without torchrun")
        check_cp_launch(args.cp, world)
        folder = pathlib.Path(args.path or "").absolute().parent  # RULER's own file: its folder names its task
        if args.task == "jsonl" and (args.path or "").endswith("validation.jsonl") and folder.name in ruler.TASKS:
            args.task, args.data, args.tasks = "ruler", [str(folder.parent)], folder.name
        args.out = args.out or os.path.join("out", "eval", args.task)
        try:  # before any weight loads: a folder that cannot hold the results fails now, not hours later
            os.makedirs(args.out, exist_ok=True)
            tempfile.TemporaryFile(dir=args.out).close()  # a probe file, written and removed
        except OSError as e:
            raise UserError(f"--out {args.out} is not a writable folder ({e.strerror or e})") from None
        if args.score:  # predictions made elsewhere: no model, no tokenizer
            refuse([(args.task not in BENCHES, f"--score scores {' or '.join(BENCHES)} prediction files, not {args.task}")])
            return finish_bench(args, longbench.read_predictions(args.task, args.score)) or 0
        if args.task in ("ruler", *BENCHES) and args.prepare_only:  # the tokenizer alone; no process group, no weights
            tok = data.load_tokenizer(args.model)
            fill_defaults(args, M.args_from_hf_config(M.read_hf_config(m := args.model), f"{m}/config.json").max_seq_len)
            args.chat = args.chat and tok.chat_template is not None
            return (prepare_ruler if args.task == "ruler" else prepare_bench)(args, tok) or 0
        settings = dict({k: v for k, v in vars(args).items() if k not in ("out", "cache")}, weights={
            f.name: f.stat().st_mtime_ns for f in pathlib.Path(args.model).glob("*.safetensors")})
        log = item_log(args.out, settings) if reporting else ({}, lambda item: item)  # a retrained model's times differ
        d = train.setup_distributed(args.cp)  # gloo on CPU, NCCL on cuda:LOCAL_RANK; one device without torchrun
        if d.world > 1:  # every rank skips what rank 0's log holds
            dist.broadcast_object_list(box := [log[0]], src=0)
            log = box[0], log[1]
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if reporting else devnull), \
                contextlib.redirect_stderr(sys.stderr if reporting else devnull):
            model, tok = load_model(args.model, args.dtype, d)
            fill_defaults(args, model.args.max_seq_len)
            args.chat = args.chat and tok.chat_template is not None  # a base model's tokenizer has none
            run = {"ppl": run_ppl, "ruler": run_ruler, "infinitebench": run_bench, "lveval": run_bench}
            run.get(args.task, run_generation)(args, model, tok, d, log)
    except (UserError, FileNotFoundError) as e:
        if reporting:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if d is not None and d.world > 1:
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
