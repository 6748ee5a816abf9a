"""The paper's evidence in miniature: a tiny model breaks past its training window, the recipe
extends that window 16x, and the paper's ablations are measured side by side, on a laptop CPU.

    python bench/ablation.py                      # full: within 30 minutes on 2 CPU cores
    python bench/ablation.py --quick              # smoke test: every stage, tiny budgets, minutes

What it runs, only through the public CLIs (train.py, sft.py, eval.py) and functions (data, eval, train):
  1. data: the training code is the top-level modules of the Python standard library (a subset of
     data.builtin_corpus_files()); the retrieval task is generated: prompt/completion records in
     which a secret capital letter sits at a random depth of random characters and is asked for at
     the end (letter_sample), and evaluation records of the same kind that training never saw;
  2. base: the tiny preset from random weights at a short window W (256 tokens), plain RoPE:
     train.py on the code (a language model first), then sft.py on the retrieval records (trained
     on the letter only) blended with pieces of the code (trained on every token, so that it stays
     a code model), every record weighing the same (--loss-weighting conversation); the paper
     starts from an instruct model: one that does the task within its window;
  3. stage 1 at 16 W (4K) on the code, equal token budgets: YaRN as the paper (alpha 1, beta 4, the
     `<s>` separator, no cross-document mask), NTK-aware theta scaling, no scaling, YaRN with the
     BOS token as separator, YaRN with the cross-document mask, and YaRN in two steps (4 W, then
     16 W, half the tokens each); then stage 2: a short sft.py on the same blend, rows
     of W tokens (the paper's short instruction tuning, the same for every variant);
  4. evaluation of the base (zero-shot: as it is, and with YaRN or NTK applied but untrained) and
     of every variant: loss by position up to 16 W (`eval.py ppl`) on held-out sources (the
     asyncio, email and multiprocessing packages, which the training corpus does not contain), and
     retrieval accuracy at W, 4 W and 16 W (`eval.py jsonl`, exact match of the letter);
  5. a report in --out: report.md (the ablation table, findings, seeds, budgets, wall times, the
     machine), results.json (every number), loss_by_position.png, niah_by_length.png, and every
     command run (commands.sh) with its log (logs/).

Seeds: one base (the paper starts every ablation from one Llama); each variant's stage 1 and its
evaluation samples are repeated with every seed in --seeds. A difference between two rows counts
only when their ranges over the seeds do not overlap; otherwise the report says "no difference".

Each subprocess runs with a fixed number of threads (--threads), so a second run with the same
seeds and thread counts on the same machine reproduces every number, whatever --jobs is.
"""

import argparse
import concurrent.futures
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as evaluation  # noqa: E402  (not the builtin)
import train  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN_CORPUS = [os.path.join(STDLIB, "*.py")]  # the standard library's top-level modules
HELD_OUT = [os.path.join(STDLIB, p, "*.py") for p in ("asyncio", "email", "multiprocessing")]
MIN_RETRIEVAL_LENGTH = 150  # the shortest retrieval prompt trained on (tokens)


# ----------------------------------------------------------------------------------------------
# the two sizes of the experiment

@dataclass
class Scale:
    window: int  # the base's training window W
    factor: int  # stage 1 trains at factor x W
    two_step_first: int  # the two-step variant's first window, in multiples of W
    base_lm_steps: int  # the base's train.py run on the code, from random weights
    base_lm_batch: int  # sequences of W tokens
    base_lm_lr: float
    base_steps: int  # then sft.py on the retrieval records blended with code (language modelling)
    sft_batch: int  # rows of W tokens per step, base and stage 2
    sft_lr: float
    stage1_steps: int  # per variant; even, so the two-step variant splits it in halves
    stage1_batch: int  # sequences of factor x W tokens
    stage1_lr: float
    stage2_steps: int  # sft.py steps after stage 1, at W
    retrieval_records: int  # generated retrieval prompt/completion records
    code_records: int  # pieces of the training code (language modelling), blended with them
    niah_depths: str
    niah_samples: int  # retrieval records per length x depth, per seed
    ppl_docs: int
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    base_seed: int = 0

    @property
    def ctx(self) -> int:
        return self.window * self.factor

    @property
    def stage1_tokens(self) -> int:
        return self.stage1_steps * self.stage1_batch * self.ctx

    @property
    def niah_lengths(self) -> list[int]:
        """W, 4 W and 16 W (as far as stage 1 reaches), leaving out lengths too short for the needle."""
        lengths = [self.window * k for k in (1, 4, 16) if k <= self.factor]
        return [n for n in lengths if n >= MIN_RETRIEVAL_LENGTH] or [self.ctx]


FULL = Scale(window=256, factor=16, two_step_first=4, base_lm_steps=150, base_lm_batch=16, base_lm_lr=2e-3,
             base_steps=350, sft_batch=16, sft_lr=2e-3,
             stage1_steps=12, stage1_batch=2, stage1_lr=5e-4, stage2_steps=30, retrieval_records=8000,
             code_records=8000,
             niah_depths="0.1,0.3,0.5,0.7,0.9", niah_samples=4, ppl_docs=4)
QUICK = Scale(window=192, factor=4, two_step_first=2, base_lm_steps=2, base_lm_batch=2, base_lm_lr=1e-3,
              base_steps=2, sft_batch=2, sft_lr=1e-3,
              stage1_steps=2, stage1_batch=1, stage1_lr=5e-4, stage2_steps=2, retrieval_records=32,
              code_records=32,
              niah_depths="0.5", niah_samples=1, ppl_docs=1, seeds=[0])


# ----------------------------------------------------------------------------------------------
# the rows of the table

@dataclass
class Variant:
    name: str
    label: str
    stage1: list[str] | None  # train.py options of stage 1; None: the base evaluated zero-shot
    zero_shot_rope: str | None = None  # zero-shot rows: the scaling applied to the untrained base
    two_step: bool = False


VARIANTS = [
    Variant("base", "base, plain RoPE, no extension", None),
    Variant("base+yarn", "base + YaRN, untrained", None, zero_shot_rope="yarn"),
    Variant("base+ntk", "base + NTK, untrained", None, zero_shot_rope="ntk"),
    Variant("yarn", "YaRN (paper: alpha 1, beta 4, `<s>`, no mask)", ["--rope", "yarn"]),
    Variant("ntk", "NTK-aware theta scaling", ["--rope", "ntk"]),
    Variant("none", "no RoPE scaling", ["--rope", "none"]),
    Variant("yarn-bos", "YaRN, BOS token as separator", ["--rope", "yarn", "--separator", "bos"]),
    Variant("yarn-docmask", "YaRN, cross-document mask on", ["--rope", "yarn", "--doc-mask"]),
    Variant("yarn-2step", "YaRN in two steps (4x, then 16x)", ["--rope", "yarn"], two_step=True),
]
REFERENCE = "yarn"  # the paper's recipe: every other trained row is compared with it


# ----------------------------------------------------------------------------------------------
# running commands: logged, fixed threads, a few at a time

class Runner:
    def __init__(self, out: str, threads: int, jobs: int):
        self.out, self.threads, self.jobs = out, threads, jobs
        self.wall = {}  # task name -> seconds
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        self.commands = open(os.path.join(out, "commands.sh"), "w")
        self.commands.write("#!/bin/sh\n# every command bench/ablation.py ran, in order (run from the repository root)\n")

    def run(self, name: str, cmd: list[str], threads: int | None = None):
        """One command to completion; its output goes to logs/NAME.log; stops everything on failure."""
        threads = threads or self.threads
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONHASHSEED="0", TQDM_MININTERVAL="30")
        log_path = os.path.join(self.out, "logs", name + ".log")
        self.commands.write(f"OMP_NUM_THREADS={threads} " + shlex.join(cmd) + "\n")
        self.commands.flush()
        start = time.perf_counter()
        with open(log_path, "w") as log:
            result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.wall[name] = time.perf_counter() - start
        if result.returncode != 0:
            with open(log_path) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"error: {name} failed (exit {result.returncode}); the end of {log_path}:\n{tail}")
        print(f"  {name}: {self.wall[name]:.0f} s", flush=True)

    def run_all(self, tasks: list[tuple[str, list[str]]]):
        """Independent commands, --jobs at a time, each on its own --threads."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for future in [pool.submit(self.run, name, cmd) for name, cmd in tasks]:
                future.result()


def train_cmd(*options) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--no-activation-checkpointing", "--dtype", "fp32",
            *map(str, options)]


def eval_cmd(*options) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "eval.py"), *map(str, options)]


# ----------------------------------------------------------------------------------------------
# 1. data

# The retrieval task: a secret capital letter stated once, after a "#", at a random depth of a
# haystack of random printable characters that holds neither capital letters nor "#" (noise, as
# RULER's noise haystacks), and asked for at the end; 1/25 by chance. The prompt ends with the "#"
# so that the completion is the letter alone: one byte token that follows the only other "#" in
# the context. Finding it is the copy a code model's induction heads already do ("after this
# token, last time, came..."), which is why the tiny code model learns it within its window from
# a few hundred sft.py steps blended with code; with the needle after "is " (a token the noise and
# the sentences hold many times) it stayed at chance from a code model. The records say
# "train_eos": false, so sft.py trains the letter alone; with <|end_of_text|> in the loss as well,
# the same run reached 8% instead of 32% (bench/README.md, Ablation). "A" is left out: the SQuAD
# normalisation of exact match drops it as an article. Prompts are raw (no template), the same
# for sft.py (prompt/completion records) and eval.py jsonl ('prompt' records).
LETTERS = [chr(c) for c in range(ord("B"), ord("Z") + 1)]
NOISE = [c for c in range(32, 127) if not ord("A") <= c <= ord("Z") and c != ord("#")]  # printable ASCII
NEEDLE = " The secret letter is #{letter}. "
QUESTION = "\nWhat is the secret letter? The secret letter is #"
ANSWER_BUDGET = 1  # the letter


def letter_sample(tok, length: int, depth: float, rng: random.Random) -> tuple[dict, list[int]]:
    """A raw-prompt record ({"prompt", "answers"}) whose <|begin_of_text|> + prompt + ANSWER_BUDGET
    is exactly `length` tokens, and that prompt's tokens. The needle goes at `depth` of the noise."""
    letter = rng.choice(LETTERS)
    needle, question = tok.encode(NEEDLE.format(letter=letter)), tok.encode(QUESTION)
    room = length - 1 - len(needle) - len(question) - ANSWER_BUDGET
    if room < 1:
        raise SystemExit(f"error: a {length}-token retrieval prompt has no room for a haystack")
    noise = [rng.choice(NOISE) for _ in range(room)]  # one byte token each
    cut = round(depth * room)
    tokens = [tok.bos_id] + noise[:cut] + needle + noise[cut:] + question
    record = {"id": "", "prompt": tok.decode(tokens[1:]), "answers": [letter]}
    return record, tokens


def write_retrieval_records(path: str, n_records: int, window: int, seed: int = 0) -> dict:
    """n_records prompt/completion records for sft.py (trained on the letter only): a retrieval
    prompt of a random length that fits the base's window, and its answer. Their seeds never
    coincide with the evaluation's (write_retrieval_eval)."""
    tok = data.builtin_tokenizer()
    rng = random.Random(f"train-{seed}")
    n_tokens = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for _ in range(n_records):
            record, tokens = letter_sample(tok, rng.randint(MIN_RETRIEVAL_LENGTH, window), rng.random(), rng)
            # sft.py puts <|begin_of_text|> before the prompt and <|end_of_text|> after the answer
            # (not trained on: "train_eos": false): the evaluation's prompt tokens, exactly
            completion = record["answers"][0]
            n_tokens += len(tokens) + len(tok.encode(completion)) + 1
            f.write(json.dumps({"prompt": record["prompt"], "completion": completion, "train_eos": False}) + "\n")
    os.replace(path + ".tmp", path)
    return {"records": n_records, "tokens": n_tokens}


def write_code_records(path: str, token_file, n_records: int, window: int, seed: int = 0):
    """n_records pieces of the training code as prompt/completion records with an empty prompt:
    sft.py trains on every token of them (plain language modelling). Blended with the retrieval
    records, they keep the model a code model: sft.py on the retrieval records alone took the
    base's loss on held-out code from ~2 to ~15 nats/token (worse than uniform) in 200 steps."""
    tok = data.builtin_tokenizer()
    rng = random.Random(f"code-{seed}")
    n = window - 2  # room for <|begin_of_text|> and <|end_of_text|>
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for _ in range(n_records):
            tokens = token_file.doc(rng.randrange(token_file.n_docs))
            start = rng.randrange(max(1, len(tokens) - n))
            f.write(json.dumps({"prompt": "", "completion": tok.decode(tokens[start:start + n].tolist())}) + "\n")
    os.replace(path + ".tmp", path)


def write_retrieval_eval(path: str, scale, seed: int):
    """The evaluation's records: niah_samples per length x depth, ids "LENGTH-DEPTH-K"."""
    tok = data.builtin_tokenizer()
    rng = random.Random(f"eval-{seed}")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for length in scale.niah_lengths:
            for depth in map(float, scale.niah_depths.split(",")):
                for k in range(scale.niah_samples):
                    record, _ = letter_sample(tok, length, depth, rng)
                    record["id"] = f"{length}-{depth}-{k}"
                    f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


def prepare_data(out: str, scale: Scale) -> dict:
    """The training corpus files, the retrieval documents and evaluation records, and the held-out
    code, tokenized once up front (the parallel runs then only read the cache)."""
    import glob
    builtin = set(data.builtin_corpus_files())
    for pattern in TRAIN_CORPUS + HELD_OUT:
        files = glob.glob(pattern)
        if not files or not set(files) <= builtin:
            raise SystemExit(f"error: {pattern} should name files of the built-in corpus")
    cache = os.path.join(out, "cache")
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tok = data.builtin_tokenizer()
    corpus = data.build_token_file(TRAIN_CORPUS, tok, cache, log=None)
    held_out = data.build_token_file(HELD_OUT, tok, cache, log=None)
    retrieval, code = os.path.join(out, "data", "retrieval.jsonl"), os.path.join(out, "data", "code.jsonl")
    stats = write_retrieval_records(retrieval, scale.retrieval_records, scale.window)
    write_code_records(code, corpus, scale.code_records, scale.window)
    for seed in scale.seeds:
        write_retrieval_eval(os.path.join(out, "data", f"retrieval-eval-seed{seed}.jsonl"), scale, seed)
    return {"sft_files": [retrieval, code], "corpus_tokens": int(corpus.n_tokens),
            "retrieval_records": stats["records"], "retrieval_tokens": stats["tokens"], "held_out_files": HELD_OUT,
            "held_out_tokens": int(held_out.n_tokens), "cache": cache}


# ----------------------------------------------------------------------------------------------
# 2-3. models

def export_model(out: str, options: list[str], model: str | None = None):
    """A model as train.py would start it, exported without training: train.py's own build_model
    and export_hf. (`train.py --steps 0` would do this through the CLI, but it asks the sampler for
    a budget of 0 tokens, which data.sample_by_length refuses.)"""
    args = train.fill_defaults(train.build_parser().parse_args(
        (["--model", model] if model else []) + list(map(str, options))
        + ["--dtype", "fp32", "--no-activation-checkpointing", "--out", out, "--steps", "1"]))
    d = train.Dist()
    built = train.build_model(args, d)
    train.export_hf(built, out, train.model_tokenizer(args, built), d)


def export_zero_shot(base_hf: str, out: str, rope_kind: str, scale: Scale):
    """The base with a scaling applied (stretched to factor x W) and no training: what stage 1 starts from."""
    export_model(out, ["--ctx", scale.ctx, "--rope", rope_kind, "--original-window", scale.window], model=base_hf)


def model_dirs(out: str, scale: Scale) -> dict[tuple[str, int], str]:
    """(variant, seed) -> the HF directory to evaluate. Zero-shot rows share one model over seeds."""
    dirs = {}
    for v in VARIANTS:
        for seed in scale.seeds:
            if v.stage1 is None:
                dirs[v.name, seed] = os.path.join(out, "models", v.name, "hf")
            else:
                dirs[v.name, seed] = os.path.join(out, "models", f"{v.name}-seed{seed}", "hf")
    return dirs


def sft_cmd(*options) -> list[str]:
    """Every sft.py run weighs each record the same (--loss-weighting conversation): with the mean over
    tokens, a code record's 255 trained tokens drown a retrieval record's 2, and the blend erased the
    base's retrieval (57% -> 8% at 256 tokens; bench/README.md, Ablation)."""
    return [sys.executable, os.path.join(ROOT, "sft.py"), "--no-activation-checkpointing", "--dtype", "fp32",
            "--no-doc-mask", "--heldout", "0", "--loss-weighting", "conversation", *map(str, options)]


def train_everything(runner: Runner, out: str, scale: Scale, data_info: dict, base_threads: int):
    """The base, then stage 1 and stage 2 of every variant and seed."""
    models = os.path.join(out, "models")
    cache = data_info["cache"]
    sft_data = data_info["sft_files"]

    def sft(name, model, steps, seed):
        """(name, command) of an sft.py run on the retrieval + code blend, rows of W tokens."""
        return name, sft_cmd("--model", model, "--data", *sft_data, "--out", os.path.join(models, name),
                             "--max-len", scale.window, "--batch", scale.sft_batch, "--steps", steps,
                             "--lr", scale.sft_lr, "--seed", seed)

    print(f"base: from random weights, train.py on the code ({scale.base_lm_steps} steps x {scale.base_lm_batch} x "
          f"{scale.window}), then sft.py on the retrieval records and code ({scale.base_steps} steps x "
          f"{scale.sft_batch} rows of {scale.window})", flush=True)
    runner.run("base-lm", train_cmd("--data", *TRAIN_CORPUS, "--cache", cache, "--out", os.path.join(models, "base-lm"),
                                    "--ctx", scale.window, "--rope", "none", "--separator", "bos",
                                    "--batch", scale.base_lm_batch, "--steps", scale.base_lm_steps,
                                    "--lr", scale.base_lm_lr, "--seed", scale.base_seed), threads=base_threads)
    runner.run(*sft("base", os.path.join(models, "base-lm", "hf"), scale.base_steps, scale.base_seed),
               threads=base_threads)
    base_hf = os.path.join(models, "base", "hf")
    for v in VARIANTS:
        if v.zero_shot_rope:
            export_zero_shot(base_hf, os.path.join(models, v.name), v.zero_shot_rope, scale)

    def stage1(name, model, ctx, steps, batch, seed, options):
        return name, train_cmd("--model", model, "--data", *TRAIN_CORPUS, "--cache", cache,
                               "--out", os.path.join(models, name), "--ctx", ctx,
                               "--original-window", scale.window, "--batch", batch, "--steps", steps,
                               "--lr", scale.stage1_lr, "--seed", seed, *options)

    first, second, stage2 = [], [], []
    for v in VARIANTS:
        for seed in scale.seeds if v.stage1 else []:
            name = f"{v.name}-seed{seed}"
            if v.two_step:  # the same tokens per step: factor/first times more sequences, each shorter
                first_ctx = scale.window * scale.two_step_first
                first.append(stage1(name + "-step1", base_hf, first_ctx, scale.stage1_steps // 2,
                                    scale.stage1_batch * scale.ctx // first_ctx, seed, v.stage1))
                second.append(stage1(name + "-stage1", os.path.join(models, name + "-step1", "hf"), scale.ctx,
                                     scale.stage1_steps // 2, scale.stage1_batch, seed, v.stage1))
            else:
                first.append(stage1(name + "-stage1", base_hf, scale.ctx, scale.stage1_steps, scale.stage1_batch,
                                    seed, v.stage1))
            stage2.append(sft(name, os.path.join(models, name + "-stage1", "hf"), scale.stage2_steps, seed))
    print(f"stage 1: {len(stage2)} models of {scale.stage1_tokens:,} tokens at {scale.ctx} ({len(first) + len(second)} "
          f"runs: the two-step variant takes two), then stage 2: "
          f"{len(stage2)} runs of {scale.stage2_steps} steps x {scale.sft_batch} x {scale.window} "
          f"({args_jobs(runner)})", flush=True)
    runner.run_all(first)
    runner.run_all(second)
    runner.run_all(stage2)
    drop_checkpoints(models)


def drop_checkpoints(models: str):
    """Only the HF exports are evaluated: the resumable checkpoints (weights + AdamW) go."""
    for name in os.listdir(models):
        shutil.rmtree(os.path.join(models, name, "checkpoints"), ignore_errors=True)


def args_jobs(runner: Runner) -> str:
    return f"{runner.jobs} at a time, {runner.threads} thread(s) each"


# ----------------------------------------------------------------------------------------------
# 4. evaluation

def evaluate_everything(runner: Runner, out: str, scale: Scale, data_info: dict):
    tasks = []
    for (name, seed), model in model_dirs(out, scale).items():
        where = os.path.join(out, "eval", f"{name}-seed{seed}")
        common = ["--model", model, "--seed", seed, "--cache", data_info["cache"], "--dtype", "fp32"]
        tasks.append((f"niah-{name}-seed{seed}", eval_cmd(
            "jsonl", *common, "--out", os.path.join(where, "niah"), "--no-chat", "--max-new-tokens", ANSWER_BUDGET,
            os.path.join(out, "data", f"retrieval-eval-seed{seed}.jsonl"), "--max-len", scale.ctx)))
        tasks.append((f"ppl-{name}-seed{seed}", eval_cmd(
            "ppl", *common, "--out", os.path.join(where, "ppl"), "--lengths", scale.ctx,
            "--docs", scale.ppl_docs, "--data", *HELD_OUT)))
    print(f"evaluation: {len(tasks)} runs ({args_jobs(runner)})", flush=True)
    runner.run_all(tasks)


def read_results(out: str, scale: Scale) -> dict:
    """variant -> seed -> {"niah": {length: accuracy}, "loss": [per bucket], "buckets": [ends]}."""
    results = {}
    for (name, seed) in model_dirs(out, scale):
        where = os.path.join(out, "eval", f"{name}-seed{seed}")
        with open(os.path.join(where, "niah", "results.json")) as f:
            niah = json.load(f)
        with open(os.path.join(where, "ppl", "results.json")) as f:
            ppl = json.load(f)
        # exact match of the generated letter, by prompt length (the record ids start with it)
        accuracy = {n: evaluation.mean(it["scores"]["exact_match"] for it in niah["items"]
                                       if it["id"].startswith(f"{n}-")) for n in scale.niah_lengths}
        buckets = ppl["aggregate"]["buckets"]
        results.setdefault(name, {})[seed] = {
            "niah": accuracy, "niah_samples": sum(it["id"].startswith(f"{scale.ctx}-") for it in niah["items"]),
            "loss": [b["loss"] for b in buckets], "bucket_ends": [b["end"] for b in buckets],
            "mean_loss": ppl["aggregate"]["loss"]}
    return results


# ----------------------------------------------------------------------------------------------
# 5. the report

@dataclass
class Spread:
    """A figure over seeds: mean and range. Two figures differ only when their ranges do not overlap."""
    values: list[float]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def compare(self, other: "Spread") -> int | None:
        """+1 above other, -1 below, 0 no difference (the ranges overlap), None: one seed, no range."""
        if len(self.values) < 2 or len(other.values) < 2:
            return None
        if self.low > other.high:
            return 1
        if self.high < other.low:
            return -1
        return 0

    def text(self, digits: int = 2) -> str:
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def figures(results: dict, scale: Scale) -> dict[str, dict[str, Spread]]:
    """variant -> figure name -> Spread over the seeds."""
    table = {}
    for name, by_seed in results.items():
        runs = list(by_seed.values())
        row = {f"niah@{n}": Spread([r["niah"][n] for r in runs]) for n in scale.niah_lengths}
        row["loss first"] = Spread([r["loss"][0] for r in runs])
        row["loss last"] = Spread([r["loss"][-1] for r in runs])
        row["loss mean"] = Spread([r["mean_loss"] for r in runs])
        table[name] = row
    return table


def verdict(row: dict[str, Spread], reference: dict[str, Spread], key: str, higher_is_better: bool) -> str:
    sign = row[key].compare(reference[key])
    if sign is None:
        return "n/a (one seed)"
    return {1: "better", -1: "worse", 0: "no difference"}[sign * (1 if higher_is_better else -1)]


def chance_tail(correct: int, n: int, chance: float) -> float:
    """P(at least `correct` of n right by guessing): the one-sided binomial test."""
    return sum(math.comb(n, k) * chance ** k * (1 - chance) ** (n - k) for k in range(correct, n + 1))


RETRIEVES = 1e-3  # a row retrieves when guessing would score as well with less than this probability


def findings(table: dict, scale: Scale) -> list[str]:
    """One sentence per claim, each verdict computed from the table (never written by hand)."""
    far, near = f"niah@{scale.ctx}", f"niah@{scale.niah_lengths[0]}"
    base, ref = table["base"], table[REFERENCE]
    chance = f"chance {1 / len(LETTERS):.2f}"
    n = len(scale.niah_depths.split(",")) * scale.niah_samples * len(scale.seeds)  # prompts per length, all seeds
    tail = chance_tail(round(base[near].mean * n), n, 1 / len(LETTERS))
    rises = base["loss last"].low > base["loss first"].high
    lines = [f"Perplexity: the base's loss in the last {scale.window}-token bucket of {scale.ctx} tokens is "
             f"{base['loss last'].text()} nats/token against {base['loss first'].text()} in the first "
             f"{scale.window}: " + ("it breaks past its window." if rises else "it does NOT break past its window.")]
    if tail < RETRIEVES:
        lines.append(f"Retrieval: the base retrieves within its window ({base[near].text()} at "
                     f"{scale.niah_lengths[0]} tokens, {chance}; guessing would do as well with probability "
                     f"{tail:.0e} over the {n} prompts) and {base[far].text()} at {scale.ctx}.")
    else:
        lines.append(f"Retrieval: NOT testable here: the base does not retrieve within its own window "
                     f"({base[near].text()} at {scale.niah_lengths[0]} tokens, {chance}: guessing would do as well "
                     f"with probability {tail:.2f} over the {n} prompts), so retrieval past it says nothing; every "
                     f"retrieval figure below is read as noise around chance.")
    lines.append(f"The recipe (stage 1 with YaRN, then stage 2): accuracy at {scale.ctx} tokens {ref[far].text()} vs the "
                 f"unextended base's {base[far].text()} ({verdict(ref, base, far, True)}); last-bucket loss "
                 f"{ref['loss last'].text()} vs {base['loss last'].text()} ({verdict(ref, base, 'loss last', False)}).")
    for name in ("base+yarn", "base+ntk"):
        row = table[name]
        lines.append(f"Zero-shot {name[5:].upper()} (no training): last-bucket loss {row['loss last'].text()} vs plain "
                     f"RoPE's {base['loss last'].text()} ({verdict(row, base, 'loss last', False)}); accuracy at "
                     f"{scale.ctx} tokens {row[far].text()} vs {base[far].text()} ({verdict(row, base, far, True)}).")
    for v in VARIANTS:
        if v.stage1 is None or v.name == REFERENCE:
            continue
        row = table[v.name]
        lines.append(f"{v.label} against the paper's YaRN: accuracy at {scale.ctx} tokens "
                     f"{row[far].text()} vs {ref[far].text()} ({verdict(row, ref, far, True)}), last-bucket loss "
                     f"{row['loss last'].text()} vs {ref['loss last'].text()} "
                     f"({verdict(row, ref, 'loss last', False)}).")
    return lines


def markdown_table(table: dict, scale: Scale) -> str:
    header = (["row", "stage 1"] + [f"NIAH {n // scale.window}x ({evaluation.format_length(n)})"
                                    for n in scale.niah_lengths]
              + [f"loss 0-{scale.window}", f"loss last {scale.window}", f"loss 0-{evaluation.format_length(scale.ctx)}",
                 f"NIAH {scale.factor}x vs YaRN", "last loss vs YaRN"])
    rows = []
    far = f"niah@{scale.ctx}"
    for v in VARIANTS:
        row = table[v.name]
        compare = ["reference", "reference"] if v.name == REFERENCE else (
            ["", ""] if v.stage1 is None else
            [verdict(row, table[REFERENCE], far, True), verdict(row, table[REFERENCE], "loss last", False)])
        rows.append([v.label, "none (zero-shot)" if v.stage1 is None else f"{scale.stage1_tokens:,} tokens"]
                    + [row[f"niah@{n}"].text() for n in scale.niah_lengths]
                    + [row["loss first"].text(3), row["loss last"].text(3), row["loss mean"].text(3)] + compare)
    return evaluation.markdown_table(header, rows)


def plot(results: dict, scale: Scale, out: str) -> list[str]:
    plt = evaluation.pyplot()
    if plt is None:
        print("matplotlib is not installed: no PNG drawn (the numbers are in results.json)")
        return []
    groups = [("zero-shot from the base", [v for v in VARIANTS if v.stage1 is None]),
              ("after stages 1 and 2", [v for v in VARIANTS if v.stage1 is not None])]
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (title, variants) in zip(axes, groups):
        for v in variants:
            runs = list(results[v.name].values())
            x = runs[0]["bucket_ends"]
            mean = [sum(r["loss"][i] for r in runs) / len(runs) for i in range(len(x))]
            line, = ax.plot(x, mean, marker=".", label=v.label)
            ax.fill_between(x, [min(r["loss"][i] for r in runs) for i in range(len(x))],
                            [max(r["loss"][i] for r in runs) for i in range(len(x))], color=line.get_color(), alpha=0.2)
        ax.axvline(scale.window, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel(f"position (end of {scale.window}-token bucket); dashed: the base's window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats/token, held-out code)")
    fig.tight_layout()
    paths.append(os.path.join(out, "loss_by_position.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    lengths = scale.niah_lengths
    for ax, (title, variants) in zip(axes, groups):
        for i, v in enumerate(variants):
            runs = list(results[v.name].values())
            mean = [sum(r["niah"][n] for r in runs) / len(runs) for n in lengths]
            low = [m - min(r["niah"][n] for r in runs) for m, n in zip(mean, lengths)]
            high = [max(r["niah"][n] for r in runs) - m for m, n in zip(mean, lengths)]
            shift = 1 + 0.03 * (i - len(variants) / 2)  # keep overlapping error bars apart
            ax.errorbar([n * shift for n in lengths], mean, yerr=[low, high], marker="o", capsize=3, label=v.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [evaluation.format_length(n) for n in lengths])
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("retrieval accuracy (exact match)")
    fig.tight_layout()
    paths.append(os.path.join(out, "niah_by_length.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return (f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores "
            f"visible, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_report(out: str, scale: Scale, results: dict, meta: dict):
    table = figures(results, scale)
    lines = findings(table, scale)
    pngs = plot(results, scale, out)
    report = [
        "# The paper's ablations in miniature",
        "",
        f"`{meta['command']}`, {meta['date']}, {meta['machine']}; load average {meta['load_before']} before, "
        f"{meta['load_after']} after. Wall time {meta['wall_s'] / 60:.1f} min "
        f"(data {meta['stage_s']['data']:.0f} s, base {meta['stage_s']['base']:.0f} s, stages 1 and 2 "
        f"{meta['stage_s']['stage1']:.0f} s, evaluation {meta['stage_s']['eval']:.0f} s); "
        f"{meta['jobs']} runs at a time, {meta['threads']} thread(s) each (base: {meta['base_threads']}).",
        "",
        f"Base: the tiny preset from random weights at a window of {scale.window}, plain RoPE (theta 10000). "
        f"First `train.py` on the standard library's top-level modules ({meta['data']['corpus_tokens']:,} tokens), "
        f"BOS between documents: {scale.base_lm_steps} steps x {scale.base_lm_batch} x {scale.window}, lr "
        f"{scale.base_lm_lr}. Then `sft.py` on {meta['data']['retrieval_records']:,} generated retrieval "
        f"prompt/completion records (a secret capital letter after a `#` hidden at a random depth in random printable "
        f"characters, asked for at the end, {MIN_RETRIEVAL_LENGTH}-{scale.window} tokens each, trained on the letter "
        f"only) blended with {scale.code_records:,} pieces of the same code (trained on every token: language "
        f"modelling), {scale.base_steps} steps x {scale.sft_batch}, lr {scale.sft_lr} (cosine), every record "
        f"weighing the same (`--loss-weighting conversation`); seed {scale.base_seed}.",
        f"Stage 1 (`train.py`, code only): {scale.ctx} tokens ({scale.factor}x), {scale.stage1_steps} steps x "
        f"{scale.stage1_batch} x {scale.ctx} = {scale.stage1_tokens:,} tokens per variant (two-step: half at "
        f"{scale.window * scale.two_step_first}, half at {scale.ctx}), lr {scale.stage1_lr}. Stage 2 (`sft.py`, the "
        f"same blend, rows of {scale.window}: short instruction tuning, as the paper's): "
        f"{scale.stage2_steps} steps x {scale.sft_batch}, lr {scale.sft_lr}. Seeds "
        f"{', '.join(map(str, scale.seeds))} (data order and evaluation records; one base for all).",
        f"Evaluation on held-out sources ({meta['data']['held_out_tokens']:,} tokens of the asyncio, email and "
        f"multiprocessing packages): `eval.py ppl` over {scale.ppl_docs} x {scale.ctx} tokens in {scale.window}-token "
        f"buckets; retrieval: `eval.py jsonl --no-chat` on generated raw-prompt records of "
        f"{', '.join(map(str, scale.niah_lengths))} "
        f"tokens, the letter at depths {scale.niah_depths}, {scale.niah_samples} record(s) each, per seed; accuracy = "
        f"exact match of the generated letter (chance: 1/{len(LETTERS)}).",
        "",
        "Cells: mean over the seeds (min-max). A row differs from the paper's YaRN only when the ranges do not "
        "overlap; otherwise: no difference.",
        "",
        markdown_table(table, scale),
        "",
        "## Findings (computed)",
        "",
        *[f"- {line}" for line in lines],
        "",
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs],
        "",
    ]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(report))
    summary = {"scale": asdict(scale), "meta": meta, "findings": lines,
               "table": {name: {k: {"mean": s.mean, "min": s.low, "max": s.high, "values": s.values}
                                for k, s in row.items()} for name, row in table.items()},
               "runs": {name: {str(seed): r for seed, r in by_seed.items()} for name, by_seed in results.items()}}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(report[:-2]))
    print(f"\nwrote {os.path.join(out, 'report.md')}, results.json and {len(pngs)} PNG(s)")


# ----------------------------------------------------------------------------------------------

def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every stage at toy size (a smoke test, minutes)")
    p.add_argument("--out", default="runs/ablation", help="where models, evaluations and the report go")
    p.add_argument("--seeds", default=None, help="comma-separated stage-1/evaluation seeds (full: 0,1; quick: 0)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time after the base (default 2)")
    p.add_argument("--threads", type=int, default=1, help="threads of each of those runs (default 1)")
    p.add_argument("--base-threads", type=int, default=2, help="threads of the base's training run (default 2)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md, results.json and the PNGs from a finished run in --out (runs nothing)")
    args = p.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.seeds:
        scale.seeds = [int(s) for s in args.seeds.split(",")]
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            meta = json.load(f)["meta"]
        return write_report(args.out, scale, read_results(args.out, scale), meta)
    for name in ("models", "eval", "logs", "data"):  # a fresh run; the token cache is kept
        shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    runner = Runner(args.out, args.threads, args.jobs)
    meta = {"command": shlex.join(["python", "bench/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "load_before": load_average(),
            "jobs": args.jobs, "threads": args.threads, "base_threads": args.base_threads, "stage_s": {}}
    start = time.perf_counter()
    meta["data"] = prepare_data(args.out, scale)
    meta["stage_s"]["data"] = time.perf_counter() - start
    train_everything(runner, args.out, scale, meta["data"], args.base_threads)
    meta["stage_s"]["base"] = runner.wall["base-lm"] + runner.wall["base"]
    meta["stage_s"]["stage1"] = time.perf_counter() - start - meta["stage_s"]["data"] - meta["stage_s"]["base"]
    mark = time.perf_counter()
    evaluate_everything(runner, args.out, scale, meta["data"])
    meta["stage_s"]["eval"] = time.perf_counter() - mark
    meta["wall_s"] = time.perf_counter() - start
    meta["load_after"] = load_average()
    meta["task_wall_s"] = runner.wall
    write_report(args.out, scale, read_results(args.out, scale), meta)


if __name__ == "__main__":
    main()
