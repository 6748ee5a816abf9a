"""Stage 2 of the recipe: short instruction tuning that keeps the long window.

    python sft.py                          # the checkpoint `python train.py` wrote (or tiny), built-in
                                           # SYNTHETIC chat task, CPU, a few minutes
    torchrun --nproc_per_node 8 sft.py --model out/train/hf --data sharegpt.jsonl math.jsonl:0.5 --max-len 8K

train.py's loop, distributed setup, checkpoints, metrics and export with other data: the SFT sets as
published (`messages`, ShareGPT, Alpaca-style, MetaMath or plain prompt/completion records, in JSONL,
.json, .jsonl.zst or Parquet; README's table), several files blended by weight (`path:weight`),
formatted with the Llama 3.1 template and packed to --max-len; only the answers are trained (a token
of a short answer weighs as much as one of a long one).
The model's RoPE (YaRN from stage 1) and window are kept: short SFT does not undo the long window.
"""
import collections, hashlib, math, os, random

import numpy as np
import torch

import data
import model as M
import rope, train
from rope import UserError
from train import print0

SYNTHETIC_LETTERS, SYNTHETIC_RUN = "abcdefghijklmnopqrstuvwxyz", (12, 40)  # the answers; how often a prompt repeats one

# --- Stage 2's data: chat records, formatted, blended by weight, packed into rows -------------------
# The SFT sets as published, each recognised by a field of its own: the format -> those fields.
CHAT_FORMATS = {"messages": {"messages"}, "ShareGPT": {"conversations"}, "Alpaca": {"instruction"},
                "MetaMath": {"query"}, "prompt/completion": {"prompt", "completion"}}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

def record_format(record):  # the one format whose fields the record has, or a sentence naming them
    present = [k for k, v in record.items() if v is not None]  # Parquet writes an absent field as None
    found = [name for name, fields in CHAT_FORMATS.items() if fields & set(present)]
    if found == ["messages", "prompt/completion"] and "completion" not in present:
        found = ["messages"]  # HF chat sets (UltraChat, No Robots) repeat the first user turn as 'prompt'
    fields = ", ".join(present) or "none"
    if not found:
        raise UserError(f"the record's fields ({fields}) fit none of the formats {', '.join(CHAT_FORMATS)}")
    if len(found) > 1:
        raise UserError(f"the record's fields ({fields}) fit several formats at once: {' and '.join(found)}")
    return found[0]

def _text(record, field, default=None):  # a string field of an Alpaca or MetaMath record; None: absent
    value = default if record.get(field) is None else record[field]
    if not isinstance(value, str):
        raise UserError(f"the record's '{field}' is " + ("missing" if value is None else "not a string"))
    return value

def chat_messages(record, fmt):
    """A ShareGPT, Alpaca (GPTeacher, WizardCoder, MathInstruct) or MetaMath record as Llama 3.1 messages."""
    if fmt == "ShareGPT":
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise UserError("'conversations' is not a non-empty list")
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
                raise UserError(f"'conversations' turn {j} is not an object with 'from' and a string 'value'")
            if turn["from"] not in SHAREGPT_ROLES:
                expected = ", ".join(SHAREGPT_ROLES)
                raise UserError(f"'conversations' turn {j} is from {turn['from']!r} (expected {expected})")
        return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in turns]
    if fmt == "MetaMath":
        return [{"role": "user", "content": _text(record, "query")},
                {"role": "assistant", "content": _text(record, "response")}]
    answer = [field for field in ("output", "response") if record.get(field) is not None]
    if not answer:
        raise UserError("the record has neither 'output' nor 'response', so it has no answer")
    if len(answer) > 1:
        raise UserError("the record has both 'output' and 'response', so its answer is ambiguous")
    user, extra = _text(record, "instruction"), _text(record, "input", default="")
    return [{"role": "user", "content": (user + "\n\n" + extra) if extra else user},
            {"role": "assistant", "content": _text(record, answer[0])}]

def _record_pieces(tok, record):
    """A record -> (its format, pieces): a list of messages, or a record of CHAT_FORMATS (the messages chat_messages
    makes); or a plain {"prompt", "completion"} (no template: <|begin_of_text|> prompt completion <|end_of_text|>, the
    two encoded apart as generation sees them), trained on the completion and the end token ("train_eos": false:
    the completion alone)."""
    fmt = record_format(record) if isinstance(record, dict) else "messages"
    if fmt == "prompt/completion":
        prompt, completion, train_eos = record.get("prompt"), record.get("completion"), record.get("train_eos", True)
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise UserError("a prompt/completion record needs a string 'prompt' and a non-empty string 'completion'")
        if not isinstance(train_eos, bool):
            raise UserError(f"'train_eos' must be true or false, not {train_eos!r}")
        return fmt, [(tok.bos_id, False), (prompt, False), (completion, True), (tok.eos_id, train_eos)]
    if fmt == "messages":
        messages = record["messages"] if isinstance(record, dict) else record
    else:
        messages = chat_messages(record, fmt)
    pieces = data.chat_pieces(tok, messages, add_generation_prompt=False)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn, so it has nothing to learn from")
    return fmt, pieces

def _blend(weights, source_of, usable, seed):
    """The conversation of every occurrence, shuffled. A weight multiplies: floor(w) copies of each
    usable conversation of the source, plus a seeded fraction of them."""
    rng, blend = np.random.default_rng(seed), []
    for s, weight in enumerate(weights):
        members = np.flatnonzero((source_of == s) & usable)
        blend.append(np.repeat(members, int(weight)))
        blend.append(rng.choice(members, size=round((weight - int(weight)) * len(members)), replace=False))
    blend = np.concatenate(blend).astype(np.int64)
    rng.shuffle(blend)
    if len(blend) == 0:
        raise UserError("the weights leave no conversations to train on")
    return blend

def _next_fit(lengths, max_len):  # row bounds, packing in order: what does not fit starts the next row
    bounds, used = [0], 0
    for j, length in enumerate(lengths):
        if used + length > max_len:
            bounds.append(j)
            used = 0
        used += length
    return np.asarray(bounds + [len(lengths)], dtype=np.int64)

class ChatDataset:
    """sources: [(a record file (see data.read_records) or glob, or a list of records; weight)]. The records (see
    _record_pieces), blended by weight (see _blend), are packed in order into padded rows of max_len tokens, labels
    -100 but where format_chat's mask is True. A longer conversation is truncated (skipped if no assistant token is
    left); a bad record raises UserError, or with skip_bad is skipped (`stats` counts both)."""
    def __init__(self, sources, tok, max_len, seed=0, skip_bad=False, doc_mask=False, log=print):
        self.ctx, self.doc_mask, self.pad_id = max_len, doc_mask, 0 if tok.pad_id is None else tok.pad_id
        bad, pieces, source_of = data.BadRecords(skip_bad), [], []
        formats = collections.Counter()  # (file, format) -> records: a file that mixes formats says so in the log
        for s, (source, weight) in enumerate(sources):
            if not (weight >= 0 and math.isfinite(weight)):
                raise UserError(f"the weight of source {s} must be a finite non-negative number, not {weight}")
            if isinstance(source, str):
                records = ((p, where, r) for p in data.expand_inputs(source) for where, r in data.read_records(p, bad))
            else:
                records = ((f"source {s}", f"conversation {k} of an in-memory source", r) for k, r in enumerate(source))
            for file, where, record in records:
                try:
                    fmt, record_pieces = _record_pieces(tok, record)
                    pieces.append(record_pieces)
                    source_of.append(s)
                    formats[file, fmt] += 1
                except UserError as e:
                    bad(file, f"{where}: {e}")
        encoded = [x for i in range(0, len(pieces), 1024) for x in data.encode_pieces(tok, pieces[i : i + 1024])]
        lengths = np.array([len(tokens) for tokens, _ in encoded], dtype=np.int64)
        usable = np.array([any(mask[:max_len]) for _, mask in encoded], dtype=bool)
        if not usable.any():  # every record was bad or too long
            raise UserError(f"the chat sources hold no usable conversations: {bad.count} bad records skipped, "
                            f"{len(usable)} longer than max_len={max_len} before the assistant's first token")
        self.tokens = np.concatenate([np.asarray(t, dtype=np.uint32) for t, _ in encoded])  # (total,) flat
        self.mask = np.concatenate([np.asarray(m, dtype=bool) for _, m in encoded])  # (total,) trainable
        self.conv_offsets, self.conv_lengths = np.cumsum(lengths) - lengths, np.minimum(lengths, max_len)
        # (m,) the conversation of each occurrence; row r holds occurrences row_bounds[r]:row_bounds[r+1]
        self.blend = _blend([w for _, w in sources], np.array(source_of, dtype=np.int64), usable, seed)
        self.row_bounds = _next_fit(self.conv_lengths[self.blend], max_len)
        self.stats = {"conversations": len(pieces), "bad_skipped": bad.count, "blended": len(self.blend),
                      "truncated": int(((lengths > max_len) & usable).sum()), "too_long_skipped": int((~usable).sum())}
        if log:
            fill = self.conv_lengths[self.blend].sum() / (len(self) * max_len)
            log("chat data: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.stats.items())
                + f"; packed into {len(self)} rows of {max_len} ({fill:.0%} full)" + bad.quoted()
                + "".join(f"\n  {file}: {n} {fmt} records" for (file, fmt), n in formats.items()))

    def __len__(self):
        return len(self.row_bounds) - 1

    def __getitem__(self, i):
        return self.read(i, 0, self.ctx)

    def read(self, i, start, stop, out=None):  # positions [start, stop) of row i, as in PackedDataset.read
        tokens = np.full(self.ctx, self.pad_id, dtype=np.int64)  # (ctx,)
        trainable = np.zeros(self.ctx + 1, dtype=bool)  # (ctx+1,) one spare: the last label is -100
        doc_ids, positions = np.full(self.ctx, -1, dtype=np.int64), np.arange(self.ctx, dtype=np.int64)
        at = 0
        for occurrence in range(self.row_bounds[i], self.row_bounds[i + 1]):
            offset, length = self.conv_offsets[self.blend[occurrence]], self.conv_lengths[self.blend[occurrence]]
            tokens[at : at + length] = self.tokens[offset : offset + length]
            trainable[at : at + length] = self.mask[offset : offset + length]
            doc_ids[at : at + length] = occurrence
            if self.doc_mask:  # positions restart at every conversation
                positions[at : at + length] = np.arange(length)
            at += length
        if self.doc_mask:
            positions[at:] = np.arange(self.ctx - at)
        # labels[j] is tokens[j+1] when that token is trainable. A conversation's first token
        # (<|begin_of_text|>) never is, so no label crosses from one conversation to the next.
        labels = np.where(trainable[1:], np.append(tokens[1:], self.pad_id), data.IGNORE_INDEX)
        out = data.empty_batch(stop - start) if out is None else out
        for key, row in zip(data.BATCH_KEYS, (tokens, labels, positions, doc_ids)):
            out[key].numpy()[:] = row[start:stop]
        return out

def build_parser():
    p = train.common_parser("Stage 2: instruction tuning on chat data (see README)")
    p.set_defaults(out="out/sft", doc_mask=True)  # packed conversations never see each other
    p.add_argument("--data", nargs="*", help="SFT files as published (messages, ShareGPT, Alpaca, MetaMath, prompt/"
                                             "completion) or globs, each optionally path:weight (absent: the "
                                             "built-in SYNTHETIC chat task)")
    p.add_argument("--max-len", help="rows of this many tokens (default: 8K as the paper; tiny: 1K); longer "
                                     "conversations are truncated, and counted")
    p.add_argument("--loss-weighting", default="token", choices=["token", "conversation"],
                   help="a mean over the batch's answer tokens, or over its conversations of each one's mean "
                        "(LongAlign's, so that long answers do not drown short ones; needs --cp 1)")
    p.add_argument("--heldout", type=int, default=40, help="held-out SYNTHETIC prompts scored before and after "
                                                           "(single process only; 0: skip)")
    return p

def fill_defaults(args):  # the paper's stage 2 for a real model; scaled down for the tiny CPU demo
    if args.model is None and os.path.exists(os.path.join("out", "train", "hf", "config.json")):
        args.model = os.path.join("out", "train", "hf")  # what the default `python train.py` wrote
    tiny = args.model is None or M.read_hf_config(args.model)["hidden_size"] <= 1024
    args.max_len = rope.parse_size(args.max_len or ("1K" if tiny else "8K"))
    args.ctx = args.max_len  # what the loop calls a sequence
    args.lr = (3e-3 if tiny else 5e-6) if args.lr is None else args.lr  # tiny: 5e-4, 1e-3 left the letter a guess
    args.batch = (4 if tiny else 128) if args.batch is None else args.batch  # tiny: more, smaller steps, same tokens
    args.steps = (80 if tiny else 150) if args.steps is None else args.steps  # paper: 480/140/150 (1M/2M/4M)
    if args.loss_weighting == "conversation" and args.cp > 1:
        raise UserError("--loss-weighting conversation needs whole conversations on each process; use it "
                        "with --cp 1 (instruction tuning rows of 8K tokens need no context parallelism)")
    train.check_flags(args, "--max-len", [("--heldout", args.heldout, 0)])
    return args

def synthetic_chat(n: int, seed: int = 0, split: str = "train") -> list[list[dict]]:
    """n SYNTHETIC conversations (made by code) for the CPU demo: name the letter a prompt repeats ("Letter: qqqq..."
    -> "q"; README: what stayed at chance). split="test" keeps a hashed tenth of the 26 x 29 prompts, never in "train"
    (the 26 answers are shared: chance 1/26); messages[-1]["content"] is the exact answer."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        letter = rng.choice(SYNTHETIC_LETTERS)
        prompt = "Letter: " + letter * rng.randint(*SYNTHETIC_RUN)
        if (hashlib.blake2b(prompt.encode(), digest_size=8).digest()[0] % 10 == 0) == (split == "test"):
            out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": letter}])
    return out

def chat_sources(paths, seed):  # [(source, weight)] from 'path[:weight]' arguments, or the built-in synthetic set
    sources = []
    for spec in paths or []:
        path, sep, weight = spec.rpartition(":")
        try:
            sources.append((path, float(weight)) if sep else (spec, 1.0))
        except ValueError:  # a colon that is part of the path
            sources.append((spec, 1.0))
    return sources or [(synthetic_chat(4000, seed=seed, split="train"), 1.0)]

@torch.no_grad()
def heldout_scores(model, tok, conversations) -> dict:  # exact match of greedy answers; mean loss on the answers
    model.eval()
    correct, loss_sum, loss_count = 0, 0.0, 0
    for messages in conversations:
        prompt, _ = data.format_chat(tok, messages[:-1], add_generation_prompt=True)
        answer = messages[-1]["content"]
        out = model.generate(prompt, max_new_tokens=len(tok.encode(answer)) + 4, stop_ids=tok.stop_ids)
        correct += tok.decode([t for t in out if t not in tok.stop_ids]).strip() == answer.strip()
        tokens, mask = data.format_chat(tok, messages)
        labels = torch.tensor([t if m else -100 for t, m in zip(tokens[1:], mask[1:])])[None]
        loss_sum += model(torch.tensor(tokens[:-1])[None], labels=labels, reduction="sum").item()
        loss_count += int((labels != -100).sum())
    model.train()
    return {"exact_match": correct / len(conversations), "answer_loss": loss_sum / max(1, loss_count)}

def run(args):
    d = train.prepare(args)
    model = train.build_model(args, d, extend_rope=False)
    tok = train.model_tokenizer(args, model)
    train.claim_out(args, d)
    tok.chat_template = tok.chat_template or data.LLAMA31_CHAT_TEMPLATE  # the export carries the one trained
    print0(d, f"model: {args.model or 'tiny preset'}, window {model.args.max_seq_len} kept, rope {model.args.rope}; "
              f"{args.steps} steps of {args.batch} x {args.max_len} tokens, lr {args.lr}")
    dataset = ChatDataset(chat_sources(args.data, args.seed), tok, args.max_len, seed=args.seed,
                          skip_bad=args.skip_bad, doc_mask=args.doc_mask, log=print if d.is_main else None)
    check = d.world == 1 and args.heldout > 0 and not args.resume
    heldout = synthetic_chat(args.heldout, seed=args.seed + 1, split="test") if check else []
    before = heldout_scores(model, tok, heldout) if check else None
    if train.train(args, model, dataset, tok, d) and check:  # False: a signal stopped it
        after, chance = heldout_scores(model, tok, heldout), 1 / len(SYNTHETIC_LETTERS)  # a guessed letter
        print0(d, f"held-out synthetic prompts ({len(heldout)}): exact match {before['exact_match']:.0%} -> "
                  f"{after['exact_match']:.0%} (chance {chance:.0%}), answer loss {before['answer_loss']:.3f} -> "
                  f"{after['answer_loss']:.3f}")
        M.write_json(os.path.join(args.out, "heldout.json"),
                     {"heldout_prompts": len(heldout), "chance": chance, "before": before, "after": after})

if __name__ == "__main__":
    train.main(run=run, parser=build_parser, defaults=fill_defaults)
