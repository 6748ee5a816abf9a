"""Long-context evaluation: needle in a haystack, RULER-style tasks, passkey, perplexity by position.

    python eval.py niah    --model out/train/hf --lengths 1K,2K,4K --depths 0,0.25,0.5,0.75,1
    python eval.py ruler   --model DIR --lengths 4K,8K --samples 4 [--tasks niah_single,vt,cwe]
    python eval.py passkey --model DIR --lengths 4K,8K --depths 0,0.5,1
    python eval.py ppl     --model DIR --lengths 4K --docs 4 [--bucket 256] [--data FILES]
    python eval.py jsonl   FILE.jsonl --model DIR [--max-length 128K]
    torchrun --nproc_per_node 8 eval.py niah --cp 8 --model DIR --lengths 1M   (one prompt over 8 GPUs)
    python eval.py plot    OUT_DIR        (redraws the PNG of an earlier run from its results.json)

Every run writes OUT/results.json: the model, the task, the settings, one record per item (its
prediction and scores, never its prompt) and the aggregate. niah and passkey add a heatmap PNG
(length x depth), ppl adds a CSV and a PNG of perplexity by position, ruler a table per length.

How a sample is built (the part that is easy to get wrong):
  * Lengths are in real tokens of the model's tokenizer: the prompt (chat template, instruction,
    haystack, needles, question, answer prefix) PLUS the generation budget equals the asked length.
    The haystack is cut at token level to fill exactly what remains.
  * Prompts use the tokenizer's chat template when it has one (Llama 3.1's header format); the
    user's message is assembled from token pieces inside that frame, so no special token is ever
    produced by text and the needles carry none.
  * A needle goes at fraction `depth` of the haystack's tokens, moved to the nearest word boundary
    (at most 0.5% of the haystack or 8 tokens away); every sample records where each needle is.
  * The generation budget is measured in the tokenizer's tokens (twice the reference answer, plus
    a margin); generation stops at the tokenizer's stop tokens (<|eot_id|>, <|end_of_text|>, ...).
  * Everything random is drawn from a seed derived from (--seed, task, length, depth, index):
    the same seed gives the same sample, token for token.

On one device, long inputs are prefilled in chunks against the KV cache (`Llama.generate` for the
generation tasks, `chunked_token_losses` below for perplexity): memory grows linearly with the
length and logits exist for the last position (or one chunk) only, but the KV cache must fit one
device (Llama 3.1 8B in bf16: 128 KiB per token, 128 GiB at 1M).

Context parallel (`--cp N` under `torchrun --nproc_per_node N`; niah, passkey, ruler, jsonl):
each prompt is split over all N processes (`cp_generate`). The prompt is padded at the end to a
multiple of 2 x N (a real token never attends to a later one, so its result is unchanged) and
zigzag-sharded; each rank prefills its shard with ring attention, in one pass (no chunking), and
keeps its shard's keys and values: 1/N of the KV cache each. Decoding is greedy, one token at a
time: every rank runs the new token through the whole model, attends to the real keys it holds
(pads left out, the decoded tokens' keys counted on rank 0), and the ranks' partial (out, lse)
are gathered and merged exactly in every layer: 2 all_gathers per layer per token, so decoding is
bound by that latency. Weights are replicated (N copies of the model), one prompt at a time, no
batching; there is no data-parallel evaluation and no cp path for ppl. Rank 0 prints and writes
the outputs, the other ranks stay quiet. With fp32 on CPU it gives the same tokens as one device
(tests/test_eval_cp.py); in bf16 the merge order differs from one device's, so near-ties may flip.

Scoring: exact match and token F1 after SQuAD's normalisation (lower case, no punctuation, no
articles), and RULER's string match: "all" = the fraction of references found in the prediction,
"part" = 1 if any is (case-insensitive substring, as RULER's `string_match_all/part`).
"""

import argparse
import collections
import contextlib
import csv
import hashlib
import json
import math
import os
import random
import re
import string
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import attention
import data
import model as M
import rope
import train


EvalError = rope.UserError  # transition alias: the one error type lives in rope.py


# ----------------------------------------------------------------------------------------------
# lengths and seeds

def parse_length(text: str) -> int:
    """'4K' -> 4096, '1M' -> 1048576 (binary, as the paper's 1M = 1,048,576), '3000' -> 3000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise EvalError(f"cannot read the length {text!r}; write it like 4096, 4K or 1M")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def format_length(n: int) -> str:
    for suffix, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def derive_seed(*parts) -> int:
    """A seed for one sample from everything that identifies it; independent of Python's hash()."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % (1 << 63)


def check_lengths(lengths: list[int], window: int, policy: str):
    """A length beyond the model's window either stops the run or is run with a warning."""
    beyond = [n for n in lengths if n > window]
    if not beyond:
        return
    message = (f"length {format_length(max(beyond))} is beyond the model's window of {format_length(window)} tokens "
               f"(max_position_embeddings in its config.json)")
    if policy == "refuse":
        raise EvalError(f"{message}; pass --beyond-window warn to run it anyway")
    print(f"warning: {message}; running anyway, expect lower scores (--beyond-window refuse stops instead)",
          file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# scoring

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """Best bag-of-words F1 against the references (SQuAD / LongBench / InfiniteBench's qa_f1)."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for answer in answers:
        reference = normalize_answer(answer).split()
        common = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
        if common == 0:
            continue
        precision, recall = common / len(predicted), common / len(reference)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def ruler_string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all for one sample: the fraction of references found in the prediction."""
    return sum(a.lower() in prediction.lower() for a in answers) / len(answers)


def ruler_string_match_part(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_part for one sample: 1 if any reference is found in the prediction."""
    return float(any(a.lower() in prediction.lower() for a in answers))


# ----------------------------------------------------------------------------------------------
# prompts: token pieces inside the chat frame

def prompt_frame(tok, chat: bool) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the tokens before and after the user's message.

    With the chat template: <|begin_of_text|>, the system turn, the user header ... and after the
    message <|eot_id|> plus the assistant header, exactly as format_chat renders them. Found by
    rendering the messages "X" and "Y" and keeping what the two share at each end, so whatever the
    template puts around the message is kept token for token (the "\n\n" that opens the message is
    tokenized as it is before a letter: every prompt here starts with one). Without a template:
    <|begin_of_text|> ... "\n".
    """
    if not chat:
        return ([tok.bos_id] if tok.bos_id is not None else []), tok.encode("\n")
    x, _ = data.format_chat(tok, [{"role": "user", "content": "X"}], add_generation_prompt=True)
    y, _ = data.format_chat(tok, [{"role": "user", "content": "Y"}], add_generation_prompt=True)
    n_prefix = next(i for i, (a, b) in enumerate(zip(x, y)) if a != b)
    n_suffix = next(i for i, (a, b) in enumerate(zip(x[::-1], y[::-1])) if a != b)
    if tok.decode(x[n_prefix:len(x) - n_suffix]) != "X":
        raise EvalError("cannot find where the user's message goes in the tokenizer's chat template; "
                        "pass --no-chat to use plain prompts")
    return x[:n_prefix], x[len(x) - n_suffix:]


def generation_budget(tok, answers: list[str]) -> int:
    """Room for the answer, in the tokenizer's own tokens: twice the references (models add words
    and punctuation) plus 8 for the stop token and spacing."""
    return 2 * len(tok.encode(" " + ", ".join(answers))) + 8


def needle_tokens(tok, text: str) -> list[int]:
    """A needle is its own line of plain text: no special tokens, no merge with its neighbours."""
    return tok.encode("\n" + text + "\n")


def build_sample(tok, length: int, *, chat: bool, head: str, tail: str, answer_prefix: str,
                 answers: list[str], context_fn, max_new_tokens: int | None = None, **info) -> dict:
    """Assemble prefix + head + context + tail + suffix + answer prefix, with the context sized so
    that the prompt plus the generation budget is exactly `length` tokens.

    context_fn(n) -> (context tokens, exactly n of them; needle spans within them; needle depths).
    max_new_tokens overrides the generation budget measured from the answers.
    """
    prefix, suffix = prompt_frame(tok, chat)
    head_ids, tail_ids, answer_ids = tok.encode(head), tok.encode(tail), tok.encode(answer_prefix)
    budget = max_new_tokens or generation_budget(tok, answers)
    fixed = len(prefix) + len(head_ids) + len(tail_ids) + len(suffix) + len(answer_ids) + budget
    context, spans, depths = context_fn(length - fixed)
    if len(context) != length - fixed:
        raise AssertionError(f"context of {len(context)} tokens, expected {length - fixed}")
    start = len(prefix) + len(head_ids)
    tokens = prefix + head_ids + context + tail_ids + suffix + answer_ids
    return dict(info, length=length, tokens=tokens, max_new_tokens=budget, answers=answers,
                context_span=[start, start + len(context)],
                needle_spans=[[start + a, start + b] for a, b in spans], needle_depths=depths)


def does_not_fit(task: str, length: int, n_context: int, needed: int) -> EvalError:
    return EvalError(f"{task}: at length {format_length(length)} the prompt leaves {max(n_context, 0)} tokens for "
                     f"the context but the needles need {needed}; ask for a longer length or a shorter needle")


# ----------------------------------------------------------------------------------------------
# haystacks and needle placement

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables -> pronounceable words


class Haystack:
    """Real text to hide needles in: the documents of a tokenized corpus (data.build_token_file),
    taken in a seeded order and joined by blank lines."""

    def __init__(self, tok, token_file):
        if token_file.n_docs == 0 or token_file.n_tokens == 0:
            raise EvalError(f"the haystack corpus {token_file.path} is empty")
        self.token_file = token_file
        self.separator = tok.encode("\n\n")

    def take(self, n: int, rng: random.Random) -> list[int]:
        """n tokens of whole documents in a random order (cycling if the corpus is short), cut at n."""
        order = list(range(self.token_file.n_docs))
        rng.shuffle(order)
        out, i = [], 0
        while len(out) < n:
            out.extend(self.token_file.doc(order[i % len(order)]).tolist())
            out.extend(self.separator)
            i += 1
        return out[:n]


def repeated_filler(tok, text: str, n: int) -> list[int]:
    """n tokens of `text` repeated (the classic passkey / RULER noise haystack)."""
    unit = tok.encode(text)
    return (unit * (n // len(unit) + 1))[:n]


def nearest_word_boundary(tok, tokens: list[int], position: int, radius: int) -> int:
    """The insertion point closest to `position` (within `radius`) that falls between two words,
    so a needle never splits one; `position` itself when there is none."""
    for offset in sorted(range(-radius, radius + 1), key=abs):
        p = position + offset
        if p in (0, len(tokens)):
            return p
        if 0 < p < len(tokens):
            before, after = tok.decode([tokens[p - 1]]), tok.decode([tokens[p]])
            if before[-1:].isspace() or after[:1].isspace():
                return p
    return position


def splice_needles(tok, haystack: list[int], needles: list[list[int]], depths: list[float]):
    """Insert needle i at fraction depths[i] of the haystack (moved to a word boundary).
    Needles at the same point keep their order. Returns (context, spans, actual depths)."""
    n = len(haystack)
    radius = max(8, n // 200)  # 0.5% of the haystack, or 8 tokens in a short one
    points = [nearest_word_boundary(tok, haystack, round(d * n), radius) for d in depths]
    context, spans, cursor = [], [None] * len(needles), 0
    for i in sorted(range(len(needles)), key=lambda i: (points[i], i)):
        context.extend(haystack[cursor:points[i]])
        cursor = points[i]
        spans[i] = (len(context), len(context) + len(needles[i]))
        context.extend(needles[i])
    context.extend(haystack[cursor:])
    return context, spans, [p / max(n, 1) for p in points]


def needles_in_haystack(tok, task: str, length: int, needles: list[list[int]], depths: list[float], fill):
    """context_fn for build_sample: `fill(n)` gives n haystack tokens; the needles go inside."""
    def context_fn(n_context):
        needed = sum(len(x) for x in needles)
        if n_context - needed < 1:
            raise does_not_fit(task, length, n_context, needed)
        return splice_needles(tok, fill(n_context - needed), needles, depths)
    return context_fn


def pseudo_words(rng: random.Random, n: int, syllables: int = 3, exclude=()) -> list[str]:
    """n distinct pronounceable made-up words ('bakulo'): any number of them, none a real word the
    model might favour, all from one distribution (common and rare words look alike)."""
    words, seen = [], set(exclude)
    while len(words) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


# ----------------------------------------------------------------------------------------------
# generators: one function per task; each returns a sample dict from build_sample

# The grid's needle is short on purpose: with the built-in byte-level tokenizer (1 token per byte)
# the chat frame alone is ~90 tokens, and a 256-token sample must still have room for a haystack.
NIAH_HEAD = "Find the magic number hidden in this text.\n"
NIAH_NEEDLE = "The magic number is {value}."
NIAH_QUESTION = "What is the magic number?"
NIAH_ANSWER_PREFIX = "The magic number is"
# RULER's niah templates (its constants.py), used by the ruler task's four niah variants
RULER_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the numbers afterwards.\n")
RULER_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_NIAH_QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
RULER_NIAH_ANSWER_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"


def make_niah_sample(tok, length: int, depth: float | None, seed: int, haystack: Haystack, *, chat: bool = True,
                     max_new_tokens: int | None = None, num_keys: int = 1, num_values: int = 1,
                     num_queries: int = 1, head: str = NIAH_HEAD,
                     needle: str = NIAH_NEEDLE, question: str = NIAH_QUESTION,
                     answer_prefix: str = NIAH_ANSWER_PREFIX, task: str = "niah") -> dict:
    """Needles `needle.format(key=..., value=7 random digits)` in real text; the question asks for
    the values of the first `num_queries` keys. num_keys > 1 adds distractor keys (RULER multi-key),
    num_values > 1 gives a key several values (multi-value). All needles go at `depth`, or each at
    a random depth if depth is None."""
    rng = random.Random(seed)
    keys = ["-".join(pseudo_words(rng, 2)) for _ in range(num_keys)]
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), num_keys * num_values)]  # 7 digits, distinct
    texts, answers = [], []
    for k, key in enumerate(keys):
        for value in values[k * num_values:(k + 1) * num_values]:
            texts.append(needle.format(key=key, value=value))
            if k < num_queries:
                answers.append(value)
    depths = [depth if depth is not None else rng.random() for _ in texts]
    queries = keys[:num_queries]
    query = queries[0] if num_queries == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    fill_rng = random.Random(rng.getrandbits(64))
    context_fn = needles_in_haystack(tok, task, length, [needle_tokens(tok, t) for t in texts], depths,
                                     lambda n: haystack.take(n, fill_rng))
    return build_sample(tok, length, chat=chat, max_new_tokens=max_new_tokens, head=head,
                        tail="\n" + question.format(key=query),
                        answer_prefix=answer_prefix.format(key=query), answers=answers, context_fn=context_fn,
                        task=task, depth=depth, seed=seed, needles=texts)


def make_passkey_sample(tok, length: int, depth: float | None, seed: int, *, chat: bool = True,
                        max_new_tokens: int | None = None) -> dict:
    """The classic passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key in repeated filler."""
    rng = random.Random(seed)
    passkey = str(rng.randint(10000, 99999))
    text = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    depth_used = depth if depth is not None else rng.random()
    context_fn = needles_in_haystack(tok, "passkey", length, [needle_tokens(tok, text)], [depth_used],
                                     lambda n: repeated_filler(tok, FILLER, n))
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n")
    return build_sample(tok, length, chat=chat, max_new_tokens=max_new_tokens, head=head,
                        tail="\nWhat is the pass key?",
                        answer_prefix="The pass key is", answers=[passkey], context_fn=context_fn,
                        task="passkey", depth=depth, seed=seed, needles=[text])


def make_variable_tracking_sample(tok, length: int, seed: int, *, chat: bool = True,
                                  max_new_tokens: int | None = None, num_chains: int = 1,
                                  num_hops: int = 4) -> dict:
    """RULER's variable tracking: chains "VAR A = 12345", "VAR B = VAR A", ... hidden in filler;
    name every variable that holds the first chain's value. Other chains are distractors."""
    rng = random.Random(seed)
    names = set()
    while len(names) < num_chains * (num_hops + 1):
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    names = sorted(names)
    rng.shuffle(names)
    values = [str(v) for v in rng.sample(range(10000, 100000), num_chains)]
    texts, depths = [], []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        texts += [f"VAR {chain[0]} = {values[c]}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]}" for j in range(num_hops)]
        depths += sorted(rng.random() for _ in chain)  # a chain reads in order, so its depths ascend
    answers = names[:num_hops + 1]
    context_fn = needles_in_haystack(tok, "vt", length, [needle_tokens(tok, t) for t in texts], depths,
                                     lambda n: repeated_filler(tok, FILLER, n))
    return build_sample(
        tok, length, chat=chat, max_new_tokens=max_new_tokens,
        head="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        tail=f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above.",
        answer_prefix=(f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
                       f"variables are assigned the value {values[0]}, they are:"),
        answers=answers, context_fn=context_fn, task="vt", depth=None, seed=seed, needles=texts)


def fit_word_list(tok, n_context: int, make_text, task: str, length: int, min_words: int):
    """The longest word list that fits n_context tokens: make_text(n_words) -> text, whose tokens
    are counted for real. A bisection on n_words (a few encodes); the tokens left over (less than
    one word's worth) become trailing newlines. Returns exactly n_context tokens."""
    def size(n_words):
        return len(tok.encode(make_text(n_words)))

    if size(min_words) > n_context:
        raise does_not_fit(task, length, n_context, size(min_words))
    lo = min_words  # fits
    hi = max(lo + 1, int(n_context / (size(min_words) / min_words) * 1.05) + 2)
    while size(hi) <= n_context:  # the estimate was low: widen
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= n_context else (lo, mid)
    ids = tok.encode(make_text(lo))
    return ids + repeated_filler(tok, "\n", n_context - len(ids))


def make_common_words_sample(tok, length: int, seed: int, *, chat: bool = True,
                             max_new_tokens: int | None = None, num_common: int = 10) -> dict:
    """RULER's common words extraction: a numbered list where `num_common` words appear 30 times
    and the others 3 times (2..30 and 1 at short lengths); name the common ones."""
    rng = random.Random(seed)
    common = pseudo_words(rng, num_common, syllables=4)
    list_seed = rng.getrandbits(64)

    def make_text(n_items):
        # RULER's 30 / 3 repeats when the list is long enough; fewer, still distinct, when short
        if n_items >= 2 * 30 * num_common:
            common_repeats, rare_repeats = 30, 3
        else:
            common_repeats, rare_repeats = min(30, max(2, n_items // (2 * num_common))), 1
        n_rare = max(1, (n_items - common_repeats * num_common) // rare_repeats)
        list_rng = random.Random(list_seed)  # the same list for the same size: samples are reproducible
        rare = pseudo_words(list_rng, n_rare, syllables=4, exclude=common)
        words = common * common_repeats + rare * rare_repeats
        list_rng.shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def context_fn(n_context):
        return fit_word_list(tok, n_context, make_text, "cwe", length, min_words=3 * num_common), [], []

    return build_sample(
        tok, length, chat=chat, max_new_tokens=max_new_tokens,
        head=("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n"),
        tail=f"\nQuestion: What are the {num_common} most common words in the above list?",
        answer_prefix=f"Answer: The top {num_common} words that appear most often in the list are:",
        answers=common, context_fn=context_fn, task="cwe", depth=None, seed=seed)


def make_frequent_words_sample(tok, length: int, seed: int, *, chat: bool = True,
                               max_new_tokens: int | None = None, alpha: float = 2.0) -> dict:
    """RULER's frequent words extraction: coded words with Zipf(alpha) frequencies, the most
    frequent being the noise '....'; name the next three."""
    rng = random.Random(seed)
    vocab = set()
    while len(vocab) < 2000:  # RULER's vocabulary size: enough for Zipf(2) up to ~6M words
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "...."
    zeta = sum(k ** -alpha for k in range(1, 100_000))  # the Riemann zeta function, to 1e-5
    list_seed = rng.getrandbits(64)

    def counts(n_words):
        return [int(n_words * k ** -alpha / zeta) for k in range(1, len(vocab) + 1)]

    def make_text(n_words):
        words = [w for w, c in zip(vocab, counts(n_words)) for _ in range(c)]
        random.Random(list_seed).shuffle(words)
        return " ".join(words)

    def context_fn(n_context):
        # from 80 words on, the floored Zipf counts of ranks 2..5 differ by at least 1: one answer
        return fit_word_list(tok, n_context, make_text, "fwe", length, min_words=80), [], []

    return build_sample(
        tok, length, chat=chat, max_new_tokens=max_new_tokens,
        head=("Read the following coded text and track the frequency of each coded word. "
              "Find the three most frequently appeared coded words. "),
        tail=("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
              "What are the three most frequently appeared words in the above coded text?"),
        answer_prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
        answers=vocab[1:4], context_fn=context_fn, task="fwe", depth=None, seed=seed)


def make_ruler_sample(task: str, tok, length: int, seed: int, haystack: Haystack, chat: bool = True,
                      max_new_tokens: int | None = None) -> dict:
    """One RULER task by name, with RULER's default settings (synthetic.yaml)."""
    niah = dict(head=RULER_NIAH_HEAD, needle=RULER_NIAH_NEEDLE, question=RULER_NIAH_QUESTION,
                answer_prefix=RULER_NIAH_ANSWER_PREFIX, task=task, chat=chat, max_new_tokens=max_new_tokens)
    if task == "niah_single":
        return make_niah_sample(tok, length, None, seed, haystack, **niah)
    if task == "niah_multikey":
        return make_niah_sample(tok, length, None, seed, haystack, num_keys=4, **niah)
    if task == "niah_multivalue":
        return make_niah_sample(tok, length, None, seed, haystack, num_values=4, **niah)
    if task == "niah_multiquery":
        return make_niah_sample(tok, length, None, seed, haystack, num_keys=4, num_queries=4, **niah)
    if task == "vt":
        return make_variable_tracking_sample(tok, length, seed, chat=chat, max_new_tokens=max_new_tokens)
    if task == "cwe":
        return make_common_words_sample(tok, length, seed, chat=chat, max_new_tokens=max_new_tokens)
    if task == "fwe":
        return make_frequent_words_sample(tok, length, seed, chat=chat, max_new_tokens=max_new_tokens)
    raise EvalError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}")


RULER_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


# ----------------------------------------------------------------------------------------------
# InfiniteBench / LV-Eval style files: one {"context", "input", "answers"} record per line

def load_jsonl_records(path: str) -> list[dict]:
    """Records with a 'context' string, an 'input' string (may be empty) and 'answers' (or
    InfiniteBench's 'answer'): a string or a non-empty list of strings. Or, instead of context and
    input, a raw 'prompt' string, sent as it is (sft.py's prompt/completion records take the same
    prompts). A bad line stops the run."""
    if not os.path.isfile(path):
        raise EvalError(f"the file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise EvalError(f"{where} is not a JSON object")
            raw = "prompt" in record
            if raw and not isinstance(record["prompt"], str):
                raise EvalError(f"{where} has a 'prompt' that is not a string")
            if not raw and not isinstance(record.get("context"), str):
                raise EvalError(f"{where} has no 'context' string (nor a raw 'prompt')")
            if not isinstance(record.get("input", ""), str):
                raise EvalError(f"{where} has an 'input' that is not a string")
            answers = record.get("answers", record.get("answer"))
            if isinstance(answers, str):
                answers = [answers]
            if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
                raise EvalError(f"{where} has no 'answers' (a string or a non-empty list of strings)")
            records.append({"id": record.get("id", line_number), "answers": answers,
                            **({"prompt": record["prompt"]} if raw else
                               {"context": record["context"], "input": record.get("input", "")})})
    if not records:
        raise EvalError(f"{path} holds no records")
    return records


def make_jsonl_sample(tok, record: dict, max_length: int, *, chat: bool = True,
                      max_new_tokens: int | None = None) -> dict:
    """A record's prompt, its context cut in the middle (first and last halves kept, as
    InfiniteBench and LV-Eval do) when prompt + answer would exceed max_length. A raw 'prompt' is
    used as it is: after <|begin_of_text|> alone (no template) or as the user's whole message."""
    prefix, suffix = prompt_frame(tok, chat)
    if "prompt" in record:
        head, tail, answer_ids = [], [], []
        suffix = suffix if chat else []
        context = tok.encode(record["prompt"])
    else:
        head = tok.encode("Read the following text and answer the question. Be very concise in your answer.\n\n")
        tail = tok.encode(f"\n\nQuestion: {record['input']}" if record["input"] else "\n\n")
        answer_ids = tok.encode("Answer:")
        context = tok.encode(record["context"])
    budget = max_new_tokens or generation_budget(tok, record["answers"])
    room = max_length - (len(prefix) + len(head) + len(tail) + len(suffix) + len(answer_ids) + budget)
    if room < 2:
        raise EvalError(f"record {record['id']}: its question and answer alone exceed --max-length {max_length}")
    truncated = len(context) > room
    if truncated:
        context = context[:room // 2] + context[len(context) - (room - room // 2):]
    tokens = prefix + head + context + tail + suffix + answer_ids
    return dict(task="jsonl", id=record["id"], tokens=tokens, max_new_tokens=budget, answers=record["answers"],
                length=len(tokens) + budget, truncated=truncated)


# ----------------------------------------------------------------------------------------------
# model side

def load_model(path: str, dtype: str = "auto", device: str = "auto"):
    """An HF-layout directory -> (model in eval mode, tokenizer)."""
    if not os.path.isdir(path):
        raise EvalError(f"model directory {path} does not exist; train one with `python train.py` "
                        f"or pass --model")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = M.Llama.from_pretrained(path, dtype=torch_dtype, device=device)
    model.eval()
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = data.load_tokenizer(path)
    elif model.args.vocab_size == data.BUILTIN_VOCAB_SIZE:
        tok = data.builtin_tokenizer()
    else:
        raise EvalError(f"{path} has no tokenizer.json and its vocabulary ({model.args.vocab_size}) is not the "
                        f"built-in tokenizer's ({data.BUILTIN_VOCAB_SIZE})")
    if tok.vocab_size > model.args.vocab_size:
        raise EvalError(f"the tokenizer of {path} has {tok.vocab_size} tokens but the model only "
                        f"{model.args.vocab_size}")
    return model, tok


@torch.no_grad()
def chunked_token_losses(model, tokens: list[int], chunk: int = 4096) -> np.ndarray:
    """Cross-entropy of predicting tokens[1:], (T-1,) float32: the sequence is prefilled `chunk`
    tokens at a time against a KV cache, and logits exist for `loss_chunk_size` positions at a
    time, so memory is the KV cache (linear in T) plus one chunk's activations."""
    args, weight = model.args, model.output.weight
    T = len(tokens)
    x = torch.tensor(tokens, dtype=torch.long, device=weight.device)[None]  # (1, T)
    caches = [M.KVCache(1, T, args.n_kv_heads, args.head_dim, weight.dtype, weight.device) for _ in model.layers]
    losses = torch.empty(T - 1, dtype=torch.float32)
    step = M.loss_chunk_size(args.vocab_size)
    for start in range(0, T, chunk):
        h = model.hidden_states(x[:, start:start + chunk], caches=caches)[0]  # (c, dim)
        for i in range(0, h.shape[0], step):
            # positions first..last-1 of this chunk; position p predicts token p + 1
            first, last = start + i, min(start + i + step, start + h.shape[0], T - 1)
            if first >= last:
                break
            logits = model.output(h[i:i + last - first]).float()  # (c', vocab)
            losses[first:last] = torch.nn.functional.cross_entropy(logits, x[0, first + 1:last + 1],
                                                                   reduction="none").cpu()
    return losses.numpy()


def run_generation_task(model, tok, samples, total: int, score, desc: str, prefill_chunk: int = 4096,
                        cp: int = 1) -> list[dict]:
    """Greedy generation for each sample (built lazily: a 1M-token prompt exists one at a time);
    returns one record per sample with its prediction and scores. With cp > 1 every rank of the
    launch builds the same samples and generates each one together (cp_generate)."""
    items, bar = [], None
    for sample in samples:
        if bar is None:  # opened after the first sample is built, so a sizing error prints alone
            bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)
        if cp > 1:
            new = cp_generate(model, sample["tokens"], sample["max_new_tokens"], stop_ids=tuple(tok.stop_ids))
        else:
            new = model.generate(sample["tokens"], sample["max_new_tokens"], stop_ids=tuple(tok.stop_ids),
                                 prefill_chunk=prefill_chunk)
        stopped = bool(new) and new[-1] in tok.stop_ids
        prediction = tok.decode(new[:-1] if stopped else new)
        record = {k: v for k, v in sample.items() if k != "tokens"}
        record.update(prompt_tokens=len(sample["tokens"]), prediction=prediction, stopped=stopped,
                      scores=score(prediction, sample["answers"]))
        items.append(record)
        bar.update(1)
        first_score = next(iter(record["scores"].values()))
        bar.set_postfix(length=format_length(sample["length"]), score=round(first_score, 2))
    if bar is not None:
        bar.close()
    return items


# ----------------------------------------------------------------------------------------------
# context-parallel generation: one prompt split over the ranks of a torchrun launch
#
# Prefill: the prompt, padded at the end to a multiple of 2 x cp, is zigzag-sharded; each rank
# runs the whole model on its shard with ring attention and keeps its shard's keys and values in
# its own KV caches. Decode: every rank runs the new token through the model (the same input and
# weights, so the same q, k, v everywhere); in each layer it attends to the keys it holds, and the
# ranks' partial results (out, lse) are gathered and merged exactly. The new token's own key is
# appended by the model to every rank's cache but counted on rank 0 only.

def check_cp_launch(cp: int, world: int):
    """Fail before loading anything when --cp does not match the processes torchrun started."""
    if cp < 1:
        raise EvalError(f"--cp must be at least 1, got {cp}")
    if world < cp:
        raise EvalError(f"--cp {cp} needs {cp} processes but {world} were started; "
                        f"launch with torchrun --nproc_per_node {cp} eval.py ...")
    if world % cp != 0:
        raise EvalError(f"world size {world} is not divisible by --cp {cp}")
    if world != cp:
        raise EvalError(f"{world} processes were started for --cp {cp}, but evaluation splits each prompt over "
                        f"every process (there is no data-parallel evaluation); pass --cp {world}")


def is_main_rank() -> bool:
    """True unless this is a rank other than 0 of a cp launch (those help generate, rank 0 reports)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def cp_padded_length(n: int, cp: int) -> int:
    """The prompt length rounded up to a multiple of 2 x cp, the zigzag shard's unit."""
    return -(-n // (2 * cp)) * (2 * cp)


def runs_of_true(mask: torch.Tensor) -> list[slice]:
    """The runs of True in a 1-D bool tensor: [T, T, F, T] -> [slice(0, 2), slice(3, 4)]."""
    edges = torch.diff(torch.nn.functional.pad(mask.int(), (1, 1)))  # +1 where a run starts, -1 after it ends
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [slice(a, b) for a, b in zip(starts, ends)]


@contextlib.contextmanager
def attention_swapped(model, attention_fn):
    """Use attention_fn in every layer (model.set_attention) for the duration, then the model's own."""
    original = model.layers[0].attention.attention_fn
    model.set_attention(attention_fn)
    try:
        yield
    finally:
        model.set_attention(original)


@torch.no_grad()
def cp_prefill(model, prompt: list[int], group=None, room: int = 0,
               block_size: int = attention.DEFAULT_BLOCK_SIZE):
    """Prefill `prompt` split over the ranks of `group` (None: all of them).

    Returns (logits of the last prompt token (1, vocab) fp32, the same on every rank; this rank's
    caches, one KVCache per layer with `room` slots left for decoding; this rank's global positions
    (T,), T = padded length / cp). The pads go at the END: under the causal mask no real token
    attends to a later one, so every real token's result is exactly the unpadded one. The pads' keys
    sit in the caches like any others; cp_decode_attention leaves them out.
    """
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    weight, n = model.output.weight, len(prompt)
    padded = torch.tensor(prompt + [0] * (cp_padded_length(n, cp) - n))  # any token id would do as a pad
    positions = attention.zigzag_indices(len(padded), rank, cp)  # (T,): chunks rank and 2cp-1-rank
    tokens = padded[positions].to(weight.device)[None]  # (1, T)
    args = model.args
    caches = [M.KVCache(1, len(positions) + room, args.n_kv_heads, args.head_dim, weight.dtype, weight.device)
              for _ in model.layers]
    # the whole shard in one pass: ring attention needs every rank's chunk of the same layer at once
    local_positions = positions.to(weight.device)
    with attention_swapped(model, partial(attention.ring_attention, group=group, block_size=block_size)):
        h = model.hidden_states(tokens, local_positions[None], caches=caches)  # (1, T, dim)
    # the last real token lives on one rank: it adds its hidden state, the others add zeros
    h_last = h[0, local_positions == n - 1].sum(0, keepdim=True)  # (1, dim)
    dist.all_reduce(h_last, group=group)
    return model.output(h_last).float(), caches, positions


def cp_decode_attention(prompt_keys: list[slice], n_prompt_keys: int, group=None,
                        block_size: int = attention.DEFAULT_BLOCK_SIZE):
    """The attention function (Attention.attention_fn) for one decode step under cp.

    prompt_keys: the slices of this rank's cache that hold real prompt keys (not pads); after the
    first n_prompt_keys slots come the decoded tokens' keys, which the model appends on every rank
    and which count on rank 0 only, so that each key is counted exactly once. The partial result
    over this rank's keys is gathered from every rank and merged in rank order on every rank, so
    all ranks get the same output, bit for bit.
    """
    rank, cp = dist.get_rank(group), dist.get_world_size(group)

    def attend(q, k, v, causal=True, doc_ids=None):
        # q (1, 1, H, D): the new token, the same on every rank. k, v (1, Tk, KV, D): this rank's
        # cache, the new token's key included. No causal mask: every cached key is earlier.
        B, _, H, D = q.shape
        keys = prompt_keys + ([slice(n_prompt_keys, k.shape[1])] if rank == 0 else [])
        q_heads, k_heads, v_heads = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # head-major views
        out = torch.zeros(B, H, 1, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, 1), float("-inf"), dtype=torch.float32, device=q.device)  # no key seen yet
        for run in keys:
            for start in range(run.start, run.stop, block_size):  # bounded memory for the kernel's copies
                cols = slice(start, min(start + block_size, run.stop))
                block_out, block_lse = attention.attention_block_forward(
                    q_heads, k_heads[:, :, cols], v_heads[:, :, cols], 1.0 / math.sqrt(D))
                attention.merge_partial_attention(out, lse, block_out, block_lse)
        outs, lses = [torch.empty_like(out) for _ in range(cp)], [torch.empty_like(lse) for _ in range(cp)]
        dist.all_gather(outs, out, group=group)
        dist.all_gather(lses, lse, group=group)
        out.zero_()
        lse.fill_(float("-inf"))
        for rank_out, rank_lse in zip(outs, lses):
            attention.merge_partial_attention(out, lse, rank_out, rank_lse)
        return out.transpose(1, 2).to(q.dtype)  # (1, 1, H, D)

    return attend


@torch.no_grad()
def cp_generate(model, prompt: list[int], max_new_tokens: int, stop_ids=(), group=None,
                block_size: int = attention.DEFAULT_BLOCK_SIZE) -> list[int]:
    """Greedy continuation of one prompt split over the ranks of `group` (None: all of them); every
    rank returns the same new token ids (the stop token included if hit), as Llama.generate does.
    The model's attention function is swapped for the run and put back afterwards."""
    device, n = model.output.weight.device, len(prompt)
    logits, caches, positions = cp_prefill(model, prompt, group, room=max_new_tokens, block_size=block_size)
    out = []
    with attention_swapped(model, cp_decode_attention(runs_of_true(positions < n), len(positions), group,
                                                      block_size)):
        for i in range(max_new_tokens):
            # the ranks compute the same logits; rank 0's choice is sent anyway, one integer, because
            # ranks that disagreed by one token would stop at different steps and hang the others
            next_id = logits.argmax(-1).to(torch.long)  # (1,)
            dist.broadcast(next_id, group=group, group_src=0)
            out.append(int(next_id))
            if out[-1] in stop_ids or len(out) == max_new_tokens:
                break
            position = torch.tensor([[n + i]], device=device)  # the real prompt's length, not the padded one
            h = model.hidden_states(next_id.view(1, 1), position, caches=caches)  # (1, 1, dim)
            logits = model.output(h[:, -1]).float()  # (1, vocab)
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# outputs

def write_results(out_dir: str, model_dir: str, task: str, settings: dict, items: list, aggregate: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    result = {"model": model_dir, "task": task, "settings": settings, "aggregate": aggregate, "items": items,
              "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib's pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def no_matplotlib(out_dir: str):
    print(f"matplotlib is not installed, so no PNG was drawn; the numbers are in {out_dir}/results.json. "
          f"Install it (pip install matplotlib) and run `python eval.py plot {out_dir}` to draw it.")


def plot_heatmap(path: str, lengths: list[int], depths: list[float], grid: list[list[float]], title: str) -> bool:
    """grid[d][l]: the score at depth d and length l, in [0, 1]; red = 0, green = 1."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(np.array(grid, dtype=float), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for d, row in enumerate(grid):
        for l, value in enumerate(row):
            ax.text(l, d, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ppl(path: str, buckets: list[dict], title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([b["end"] for b in buckets], [b["ppl"] for b in buckets], marker="o")
    ax.set_xlabel("position (end of bucket, tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# tasks: each builds its samples, runs them, aggregates and writes its outputs

def grid_aggregate(items, lengths, depths, metric):
    grid = [[mean(it["scores"][metric] for it in items if it["length"] == n and it["depth"] == d) for n in lengths]
            for d in depths]
    return {"score": mean(it["scores"][metric] for it in items), "metric": metric,
            "by_length": {format_length(n): mean(it["scores"][metric] for it in items if it["length"] == n)
                          for n in lengths},
            "grid": {"lengths": lengths, "depths": depths, "scores": grid}}


def run_depth_grid(args, model, tok, task: str, make_sample, score, metric: str):
    """niah and passkey: every length x depth x sample, a heatmap of `metric`."""
    cells = [(n, d, i) for n in args.lengths for d in args.depths for i in range(args.samples)]
    samples = (make_sample(n, d, derive_seed(args.seed, task, n, d, i)) for n, d, i in cells)
    items = run_generation_task(model, tok, samples, len(cells), score, task, args.prefill_chunk, args.cp)
    if not is_main_rank():  # the other ranks of a cp launch only helped generate
        return None
    aggregate = grid_aggregate(items, args.lengths, args.depths, metric)
    write_results(args.out, args.model, task, settings(args), items, aggregate)
    png = os.path.join(args.out, f"{task}_heatmap.png")
    if plot_heatmap(png, args.lengths, args.depths, aggregate["grid"]["scores"], f"{task}: {metric}"):
        print(f"wrote {png}")
    else:
        no_matplotlib(args.out)
    print(f"{task}: mean {metric} {aggregate['score']:.3f}")
    return aggregate


def run_niah(args, model, tok):
    haystack = Haystack(tok, data.build_token_file(args.haystack, tok, args.cache))
    custom = dict(needle=args.needle, question=args.question, answer_prefix=args.answer_prefix or "") \
        if args.needle else {}

    def make(n, d, seed):
        return make_niah_sample(tok, n, d, seed, haystack, chat=args.chat, max_new_tokens=args.max_new_tokens,
                                **custom)

    def score(prediction, answers):
        return {"exact_match": exact_match(prediction, answers),
                "string_match": ruler_string_match_all(prediction, answers)}

    return run_depth_grid(args, model, tok, "niah", make, score, "exact_match")


def run_passkey(args, model, tok):
    def make(n, d, seed):
        return make_passkey_sample(tok, n, d, seed, chat=args.chat, max_new_tokens=args.max_new_tokens)

    def score(prediction, answers):  # the classic test: is the key in the output
        return {"string_match": ruler_string_match_all(prediction, answers),
                "exact_match": exact_match(prediction, answers)}

    return run_depth_grid(args, model, tok, "passkey", make, score, "string_match")


def run_ruler(args, model, tok):
    tasks = args.tasks
    haystack = Haystack(tok, data.build_token_file(args.haystack, tok, args.cache))
    cells = [(n, t, i) for n in args.lengths for t in tasks for i in range(args.samples)]
    samples = (make_ruler_sample(t, tok, n, derive_seed(args.seed, "ruler", t, n, i), haystack, chat=args.chat,
                                 max_new_tokens=args.max_new_tokens) for n, t, i in cells)

    def score(prediction, answers):
        return {"string_match_all": ruler_string_match_all(prediction, answers),
                "string_match_part": ruler_string_match_part(prediction, answers)}

    items = run_generation_task(model, tok, samples, len(cells), score, "ruler", args.prefill_chunk, args.cp)
    if not is_main_rank():
        return None
    # RULER reports string_match_all x 100 for these tasks (part is for its QA tasks)
    table = {format_length(n): {t: 100 * mean(it["scores"]["string_match_all"] for it in items
                                              if it["length"] == n and it["task"] == t) for t in tasks}
             for n in args.lengths}
    for row in table.values():
        row["average"] = mean(row[t] for t in tasks)
    text = "\n\n".join(f"### RULER at {n} tokens ({args.samples} samples per task)\n\n"
                       + markdown_table(["task", "score"], [[t, f"{s:.1f}"] for t, s in row.items()])
                       for n, row in table.items())
    print(text)
    write_results(args.out, args.model, "ruler", settings(args), items, {"by_length": table})
    with open(os.path.join(args.out, "ruler_tables.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return table


def pick_documents(tok, token_file, length: int, n_docs: int, seed: int):
    """n_docs sequences of `length` tokens: documents at least that long, seeded choice; when the
    corpus has too few, the rest are documents joined by blank lines (said in the output)."""
    rng = random.Random(seed)
    long_docs = np.flatnonzero(token_file.lengths >= length).tolist()
    chosen = rng.sample(long_docs, min(n_docs, len(long_docs)))
    sequences = [(f"corpus document {i}", token_file.doc(i)[:length].tolist()) for i in chosen]
    if len(sequences) < n_docs:
        print(f"note: only {len(long_docs)} documents reach {format_length(length)} tokens; the other "
              f"{n_docs - len(sequences)} sequences join shorter documents with blank lines")
        haystack = Haystack(tok, token_file)
        for k in range(n_docs - len(sequences)):
            sequences.append((f"joined documents #{k}", haystack.take(length, rng)))
    return sequences


def run_ppl(args, model, tok):
    length = max(args.lengths)
    bucket = args.bucket or max(1, length // 16)
    token_file = data.build_token_file(args.data, tok, args.cache)
    sequences = pick_documents(tok, token_file, length, args.docs, args.seed)
    n_buckets = math.ceil((length - 1) / bucket)
    sums, counts, items = np.zeros(n_buckets), np.zeros(n_buckets), []
    # target position p (the p-th token, predicted from tokens 0..p-1) falls in bucket p // bucket
    targets = np.arange(1, length)
    for name, tokens in tqdm(sequences, desc="ppl", unit="doc", dynamic_ncols=True):
        losses = chunked_token_losses(model, tokens, args.prefill_chunk).astype(np.float64)
        index = targets[:len(losses)] // bucket
        doc_sums = np.bincount(index, weights=losses, minlength=n_buckets)
        doc_counts = np.bincount(index, minlength=n_buckets)
        sums, counts = sums + doc_sums, counts + doc_counts
        items.append({"doc": name, "tokens": len(tokens), "loss": float(losses.mean()),
                      "ppl": float(math.exp(losses.mean())),
                      "bucket_loss": [float(s / c) if c else None for s, c in zip(doc_sums, doc_counts)]})
    buckets = [{"start": b * bucket, "end": min((b + 1) * bucket, length), "tokens": int(counts[b]),
                "loss": float(sums[b] / counts[b]), "ppl": float(math.exp(sums[b] / counts[b]))}
               for b in range(n_buckets) if counts[b]]
    total_loss = float(sums.sum() / counts.sum())
    aggregate = {"loss": total_loss, "ppl": math.exp(total_loss), "length": length, "docs": len(sequences),
                 "bucket": bucket, "buckets": buckets}
    write_results(args.out, args.model, "ppl", settings(args), items, aggregate)
    csv_path = os.path.join(args.out, "ppl_by_position.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["bucket_start", "bucket_end", "tokens", "loss", "ppl"])
        for b in buckets:
            writer.writerow([b["start"], b["end"], b["tokens"], f"{b['loss']:.6f}", f"{b['ppl']:.4f}"])
    print(f"wrote {csv_path}")
    png = os.path.join(args.out, "ppl_by_position.png")
    if plot_ppl(png, buckets, f"perplexity by position ({len(sequences)} x {format_length(length)} tokens)"):
        print(f"wrote {png}")
    else:
        no_matplotlib(args.out)
    print(markdown_table(["positions", "ppl"], [[f"{format_length(b['start'])}-{format_length(b['end'])}",
                                                 f"{b['ppl']:.3f}"] for b in buckets]))
    return aggregate


def run_jsonl(args, model, tok):
    records = load_jsonl_records(args.file)
    max_length = args.max_length or model.args.max_seq_len
    check_lengths([max_length], model.args.max_seq_len, args.beyond_window)
    samples = (make_jsonl_sample(tok, r, max_length, chat=args.chat, max_new_tokens=args.max_new_tokens)
               for r in records)

    def score(prediction, answers):
        return {"exact_match": exact_match(prediction, answers), "f1": token_f1(prediction, answers)}

    items = run_generation_task(model, tok, samples, len(records), score, "jsonl", args.prefill_chunk, args.cp)
    if not is_main_rank():
        return None
    aggregate = {"exact_match": mean(it["scores"]["exact_match"] for it in items),
                 "f1": mean(it["scores"]["f1"] for it in items),
                 "truncated": sum(it["truncated"] for it in items), "records": len(items)}
    write_results(args.out, args.model, "jsonl", settings(args), items, aggregate)
    print(f"jsonl: exact match {aggregate['exact_match']:.3f}, F1 {aggregate['f1']:.3f} over {len(items)} records "
          f"({aggregate['truncated']} cut in the middle to {format_length(max_length)} tokens)")
    return aggregate


def plot_saved(args):
    """Redraw the picture of an earlier run from its results.json (e.g. after installing matplotlib)."""
    path = os.path.join(args.dir, "results.json")
    if not os.path.isfile(path):
        raise EvalError(f"{path} does not exist; run an evaluation with --out {args.dir} first")
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    task, aggregate = result["task"], result["aggregate"]
    if task in ("niah", "passkey"):
        grid = aggregate["grid"]
        png = os.path.join(args.dir, f"{task}_heatmap.png")
        drawn = plot_heatmap(png, grid["lengths"], grid["depths"], grid["scores"], f"{task}: {aggregate['metric']}")
    elif task == "ppl":
        png = os.path.join(args.dir, "ppl_by_position.png")
        drawn = plot_ppl(png, aggregate["buckets"], "perplexity by position")
    else:
        raise EvalError(f"{path} is a {task} run, which has tables but no picture")
    if not drawn:
        raise EvalError("matplotlib is not installed, so nothing can be drawn (pip install matplotlib)")
    print(f"wrote {png}")


# ----------------------------------------------------------------------------------------------
# CLI

TASKS = {"niah": run_niah, "ruler": run_ruler, "passkey": run_passkey, "ppl": run_ppl, "jsonl": run_jsonl}


def settings(args) -> dict:
    return dict(vars(args))


def parse_depths(text: str) -> list[float]:
    depths = []
    for part in text.split(","):
        try:
            depths.append(float(part))
        except ValueError:
            raise EvalError(f"cannot read the depth {part!r}; depths are fractions like 0,0.5,1") from None
    if any(not 0 <= d <= 1 for d in depths):
        raise EvalError(f"depths must lie between 0 and 1, got {text}")
    return depths


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="out/train/hf",
                        help="HF-layout model directory (default: train.py's export)")
    common.add_argument("--out", default=None, help="output directory (default: out/eval/<task>)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="default: bf16 on GPU, fp32 on CPU")
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    common.add_argument("--no-chat", dest="chat", action="store_false",
                        help="plain prompts even when the tokenizer has a chat template")
    common.add_argument("--beyond-window", default="warn", choices=["warn", "refuse"],
                        help="what to do with a length beyond the model's window")
    common.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per prefill step")
    common.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default: twice the answer's tokens + 8; part of the length)")
    common.add_argument("--cache", default=".cache/tokens", help="where tokenized corpora are kept")

    lengths = argparse.ArgumentParser(add_help=False)
    lengths.add_argument("--lengths", default=None,
                         help="comma-separated, e.g. 1K,4K,16K (default: window/8, /4, /2 and the window)")
    samples = argparse.ArgumentParser(add_help=False)
    samples.add_argument("--samples", type=int, default=1, help="samples per cell")
    context_parallel = argparse.ArgumentParser(add_help=False)
    context_parallel.add_argument("--cp", type=int, default=1,
                                  help="split each prompt over this many processes, all of the launch: "
                                       "torchrun --nproc_per_node N eval.py TASK --cp N (--prefill-chunk unused)")

    p = argparse.ArgumentParser(description="Long-context evaluation (see the module docstring).")
    sub = p.add_subparsers(dest="task", required=True)
    niah = sub.add_parser("niah", parents=[common, lengths, samples, context_parallel],
                          help="needle in a haystack: length x depth heatmap")
    niah.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions of the haystack")
    niah.add_argument("--haystack", nargs="+", default=None,
                      help="text files / directories / globs for the haystack (default: the built-in corpus)")
    niah.add_argument("--needle", default=None, help="your needle, containing {value} (and optionally {key})")
    niah.add_argument("--question", default=None, help="the question that goes with --needle ({key} allowed)")
    niah.add_argument("--answer-prefix", default=None, help="text the answer starts with, after the question")
    ruler = sub.add_parser("ruler", parents=[common, lengths, samples, context_parallel],
                           help="RULER-style synthetic tasks, a table per length")
    ruler.add_argument("--tasks", default="all", help=f"comma-separated from {','.join(RULER_TASKS)} (default: all)")
    ruler.add_argument("--haystack", nargs="+", default=None, help="haystack text for the niah tasks")
    passkey = sub.add_parser("passkey", parents=[common, lengths, samples, context_parallel],
                             help="passkey retrieval in filler text")
    passkey.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ppl = sub.add_parser("ppl", parents=[common, lengths],
                         help="perplexity by position, bucketed (sequences of the largest --lengths)")
    ppl.add_argument("--docs", type=int, default=4, help="sequences to average over")
    ppl.add_argument("--bucket", type=parse_length, default=None, help="bucket width, e.g. 1K (default: length/16)")
    ppl.add_argument("--data", nargs="+", default=None, help="documents (default: the built-in corpus)")
    jsonl = sub.add_parser("jsonl", parents=[common, context_parallel],
                           help="a local {context, input, answers} JSONL file")
    jsonl.add_argument("file")
    jsonl.add_argument("--max-length", type=parse_length, default=None, help="default: the model's window")
    plot = sub.add_parser("plot", help="redraw the PNG of an earlier run from its results.json")
    plot.add_argument("dir")
    return p


def fill_defaults(args, window: int):
    """Lengths, depths, tasks and output directory, checked; the window policy applied."""
    if args.out is None:
        args.out = os.path.join("out", "eval", args.task)
    if hasattr(args, "lengths"):
        if args.lengths is None:
            args.lengths = sorted({max(256, window // k) for k in (8, 4, 2, 1)})
        else:
            args.lengths = sorted({parse_length(x) for x in args.lengths.split(",")})
        if args.lengths[0] < 2:
            raise EvalError(f"length {args.lengths[0]} is too short to evaluate anything")
        check_lengths(args.lengths, window, args.beyond_window)
    if hasattr(args, "depths"):
        args.depths = parse_depths(args.depths)
    if getattr(args, "tasks", None) is not None:
        args.tasks = RULER_TASKS if args.tasks == "all" else args.tasks.split(",")
        unknown = [t for t in args.tasks if t not in RULER_TASKS]
        if unknown:
            raise EvalError(f"unknown RULER task {unknown[0]!r}; choose from {', '.join(RULER_TASKS)}")
    if getattr(args, "needle", None) is not None:
        if "{value}" not in args.needle or not args.question:
            raise EvalError("--needle must contain {value} and come with --question")
        for text in (args.needle, args.question, args.answer_prefix or ""):
            try:
                text.format(key="k", value="v")
            except (KeyError, IndexError, ValueError):
                raise EvalError(f"{text!r} may use {{key}} and {{value}} but no other braces") from None
    for name in ("samples", "docs", "bucket", "max_new_tokens", "max_length"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun every process runs main; all but rank 0 stay quiet and write nothing
    reporting = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    joined_group = False
    try:
        if args.task == "plot":
            plot_saved(args)
            return 0
        if not hasattr(args, "cp") and world > 1:
            raise EvalError(f"{args.task} has no context-parallel path; run it as one process, without torchrun")
        args.cp = getattr(args, "cp", 1)
        check_cp_launch(args.cp, world)
        device = args.device
        if args.cp > 1:
            device = str(train.setup_distributed(args.cp).device)  # gloo on CPU, NCCL on cuda:LOCAL_RANK
            joined_group = True
        with contextlib.ExitStack() as quiet:
            if not reporting:
                devnull = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(contextlib.redirect_stdout(devnull))
                quiet.enter_context(contextlib.redirect_stderr(devnull))  # progress bars and warnings
            model, tok = load_model(args.model, args.dtype, device)
            fill_defaults(args, model.args.max_seq_len)
            args.chat = args.chat and tok.chat_template is not None  # a base model's tokenizer has none
            TASKS[args.task](args, model, tok)
    except (EvalError, data.DataError, FileNotFoundError) as e:
        if reporting:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if joined_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
