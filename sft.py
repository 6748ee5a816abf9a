"""Stage 2 of the recipe: short instruction tuning that keeps the long window.

    python sft.py                          # the checkpoint `python train.py` wrote (or tiny), built-in
                                           # SYNTHETIC chat tasks, CPU, about a minute
    torchrun --nproc_per_node 8 sft.py --model out/train/hf --data sharegpt.jsonl math.jsonl:0.5 --max-len 8K

This is train.py's loop, distributed setup, checkpoints, metrics and export; only two things
differ. The data: chat JSONL (`{"messages": [{"role", "content"}, ...]}` per line), several files
blended by weight (`path:weight`), formatted with the Llama 3.1 template and packed to --max-len;
or plain `{"prompt", "completion"}` records (no template: <|begin_of_text|> prompt completion
<|end_of_text|>, the end token trained too unless the record says `"train_eos": false`), which may
share a blend with chat files.
The loss: labels are -100 except on the assistant's tokens, and the loop already divides the sum
of token losses by the number of trained tokens of the whole global batch (all ranks, all
micro-batches), so a short answer weighs as much as a token of a long one.

The model's RoPE settings (YaRN from stage 1) and its window are kept as they are: the paper's
point is that short SFT does not undo the long window.
"""

import json
import os
import sys

import torch

import data
import model as M
import rope
import train
from train import print0


def build_parser():
    p = train.common_parser("Stage 2: instruction tuning on chat data (see README)")
    p.add_argument("--data", nargs="*", help="chat (or prompt/completion) JSONL files or globs, each optionally path:weight "
                                             "(absent: the built-in SYNTHETIC chat set)")
    p.add_argument("--max-len", default=None, help="conversations are packed into rows of this many tokens "
                                                   "(default: 8K as the paper; tiny: 1K)")
    p.add_argument("--no-doc-mask", dest="doc_mask", action="store_false",
                   help="let a packed conversation attend to the previous ones (default: masked, positions restart)")
    p.add_argument("--skip-long", action="store_true",
                   help="skip conversations longer than --max-len instead of truncating them (counted either way)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    p.add_argument("--loss-weighting", default="token", choices=["token", "conversation"],
                   help="the loss is a mean over the batch's answer tokens (token), or over its conversations, "
                        "each the mean over its own answer tokens (conversation: LongAlign's loss weighting, so "
                        "that long answers do not drown short ones; needs --cp 1)")
    p.add_argument("--heldout", type=int, default=40,
                   help="held-out SYNTHETIC prompts scored before and after (single process only; 0: skip)")
    p.set_defaults(out="out/sft")
    return p


def fill_defaults(args):
    """The paper's stage 2 for a real model; scaled down for the tiny CPU demo."""
    if args.model is None and os.path.exists(os.path.join("out", "train", "hf", "config.json")):
        args.model = os.path.join("out", "train", "hf")  # what the default `python train.py` wrote
    tiny = args.model is None or M.read_hf_config(args.model)["hidden_size"] <= 1024
    args.max_len = rope.parse_size(args.max_len or ("1K" if tiny else "8K"))
    args.ctx = args.max_len  # what the loop calls a sequence
    args.lr = args.lr if args.lr is not None else (5e-4 if tiny else 5e-6)
    args.batch = args.batch or (8 if tiny else 128)
    args.steps = args.steps or (40 if tiny else 150)  # paper: 480 / 140 / 150 for the 1M / 2M / 4M models
    if args.loss_weighting == "conversation" and args.cp > 1:
        raise SystemExit("error: --loss-weighting conversation needs whole conversations on each process; "
                         "use it with --cp 1 (instruction tuning rows of 8K tokens need no context parallelism)")
    return args


def chat_sources(paths, tok, seed):
    """[(source, weight)] from 'path[:weight]' arguments, or the built-in synthetic set."""
    if not paths:
        return [(data.synthetic_chat(4000, seed=seed, split="train"), 1.0)]
    sources = []
    for spec in paths:
        path, sep, weight = spec.rpartition(":")
        try:
            sources.append((path, float(weight)) if sep else (spec, 1.0))
        except ValueError:  # a colon that is part of the path
            sources.append((spec, 1.0))
    return sources


@torch.no_grad()
def heldout_scores(model, tok, conversations) -> dict:
    """Exact match of greedy answers, and the mean loss on the reference answers' tokens."""
    model.eval()
    correct, loss_sum, loss_count = 0, 0.0, 0
    for messages in conversations:
        prompt, _ = data.format_chat(tok, messages[:-1], add_generation_prompt=True)
        answer = messages[-1]["content"]
        out = model.generate(prompt, max_new_tokens=len(tok.encode(answer)) + 4, stop_ids=tok.stop_ids)
        correct += tok.decode([t for t in out if t not in tok.stop_ids]).strip() == answer.strip()
        tokens, mask = data.format_chat(tok, messages)
        tokens_t = torch.tensor(tokens[:-1])[None]
        labels = torch.tensor([t if m else -100 for t, m in zip(tokens[1:], mask[1:])])[None]
        loss_sum += model(tokens_t, labels=labels, reduction="sum").item()
        loss_count += int((labels != -100).sum())
    model.train()
    return {"exact_match": correct / len(conversations), "answer_loss": loss_sum / max(1, loss_count)}


def run(args):
    d = train.prepare(args)
    model = train.build_model(args, d, extend_rope=False)
    tok = train.model_tokenizer(args, model)
    if tok.chat_template is None:  # the export carries the template training used
        tok.chat_template = data.LLAMA31_CHAT_TEMPLATE
    print0(d, f"model: {args.model or 'tiny preset'}, window {model.args.max_seq_len} kept, rope {model.args.rope}; "
              f"{args.steps} steps of {args.batch} x {args.max_len} tokens, lr {args.lr}")
    dataset = data.ChatDataset(chat_sources(args.data, tok, args.seed), tok, args.max_len, seed=args.seed,
                               skip_bad=args.skip_bad, truncate=not args.skip_long, doc_mask=args.doc_mask,
                               log=print if d.is_main else None)
    loader = data.Loader(dataset, args.micro_batch, dp_rank=d.dp_rank, dp_size=d.dp, cp_rank=d.cp_rank,
                         cp_size=d.cp, seed=args.seed)
    check = d.world == 1 and args.heldout > 0 and not args.resume
    heldout = data.synthetic_chat(args.heldout, seed=args.seed + 1, split="test") if check else []
    before = heldout_scores(model, tok, heldout) if check else None
    train.train(args, model, loader, tok, d)
    if check:
        after = heldout_scores(model, tok, heldout)
        report = {"heldout_prompts": len(heldout), "before": before, "after": after}
        print0(d, f"held-out synthetic prompts ({len(heldout)}): exact match {before['exact_match']:.0%} -> "
                  f"{after['exact_match']:.0%}, answer loss {before['answer_loss']:.3f} -> {after['answer_loss']:.3f}")
        with open(os.path.join(args.out, "heldout.json"), "w") as f:
            json.dump(report, f, indent=2)
    train.finish(d)


if __name__ == "__main__":
    train.main(sys.argv[1:], run=run, parser=build_parser, defaults=fill_defaults)
