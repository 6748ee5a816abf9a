"""Stage 1 of the recipe: continued pretraining on long packed documents under YaRN.

    python train.py                                  # tiny model, built-in corpus, CPU, ~2 minutes
    torchrun --nproc_per_node 8 train.py --ctx 1M --cp 8 --model Llama-3.1-8B-Instruct --data 'corpus/*.jsonl'

One flat loop (nanoGPT-style) with a few helpers. Parallelism uses only what PyTorch ships:
torchrun's environment, a (dp, cp) DeviceMesh, FSDP2 `fully_shard` per layer over all ranks,
per-layer activation checkpointing, and ring attention (attention.py) on the cp sub-group.
sft.py runs this same loop with chat data.

Loss accounting: every rank computes the SUM of its token losses; the number of labelled tokens
of the whole step (all ranks, all micro-batches) is all-reduced before the first forward, and
each micro-batch's loss is sum / global_count. FSDP then sums gradients over ranks (divide factor
1), so the update is the gradient of the global mean over tokens: no double scaling, and a shard
without labelled tokens contributes zero, never NaN.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

import data
import model as M
import rope
import attention

CHECKPOINT_PREFIX = "step_"


# ----------------------------------------------------------------------------------------------
# command line

def common_parser(description: str) -> argparse.ArgumentParser:
    """Options of the training loop itself, shared by stage 1 (train.py) and stage 2 (sft.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="HF-layout model directory (absent: the tiny preset)")
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, hf/ export)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree; data parallel = world / cp")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per forward")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this x lr (ProLong)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (ProLong)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each layer in backward (default: on for GPUs, off on CPU where memory is ample)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--world", type=int, default=None, help="world size for --plan (default: the current one)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: H100/H200 bf16 989; CPU: a matmul measured at start)")
    p.set_defaults(loss_weighting="token")  # stage 1: a mean over tokens; sft.py has the option
    return p


def build_parser() -> argparse.ArgumentParser:
    p = common_parser("Stage 1: continued pretraining with YaRN on long packed documents (see README)")
    p.set_defaults(out="out/train")
    p.add_argument("--data", nargs="*", help="files, directories or globs (absent: the built-in corpus)")
    p.add_argument("--cache", default=".cache/tokens", help="where tokenized corpora are kept and reused")
    p.add_argument("--ctx", default=None, help="window to train at, e.g. 4K or 1M (default: 1M, tiny: 4K)")
    p.add_argument("--tokens", default=None, help="token budget, e.g. 1G (the paper: 1B); sets --steps")
    p.add_argument("--rope", default="yarn", choices=["yarn", "ntk", "llama3", "none"])
    p.add_argument("--original-window", default=None,
                   help="the window the RoPE frequencies were pre-trained for (default: 8192 for Llama 3.1, 512 for tiny)")
    p.add_argument("--beta-fast", type=float, default=4.0, help="YaRN beta (paper: 4)")
    p.add_argument("--beta-slow", type=float, default=1.0, help="YaRN alpha (paper: 1)")
    p.add_argument("--separator", default="<s>", help="document separator: '<s>' (paper), bos, eos or none")
    p.add_argument("--doc-mask", action="store_true", help="attend within documents only (ablation; paper: off)")
    p.add_argument("--short-doc", default="4K", help="documents shorter than this are downsampled")
    p.add_argument("--long-doc", default="8K", help="documents longer than this are upsampled")
    p.add_argument("--tokenize-only", action="store_true",
                   help="tokenize --data into --cache and exit (do it once before a large multi-node run)")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit (builds nothing)")
    p.add_argument("--gpu-memory", default="80G", help="GPU memory for --plan")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for --plan's time estimate")
    return p


def fill_defaults(args):
    """The paper's stage 1 when --model is given; the same recipe scaled down for the tiny demo."""
    tiny = args.model is None
    args.ctx = rope.parse_size(args.ctx or ("4K" if tiny else "1M"))
    args.original_window = rope.parse_size(args.original_window) if args.original_window else None
    args.short_doc, args.long_doc = rope.parse_size(args.short_doc), rope.parse_size(args.long_doc)
    if args.lr is None:
        args.lr = 1e-3 if tiny else 3e-5
    if args.batch is None:
        args.batch = 2
    if args.steps is None and args.tokens is None and tiny:
        args.steps = 32
    elif args.steps is None:
        tokens = rope.parse_size(args.tokens) if args.tokens else 10 ** 9  # the paper's 1B tokens
        args.steps = max(1, math.ceil(tokens / (args.batch * args.ctx)))
    return args


# ----------------------------------------------------------------------------------------------
# distributed setup

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp: int = 1
    cp: int = 1
    dp_rank: int = 0
    cp_rank: int = 0
    cp_group: object = None
    fsdp_mesh: object = None

    @property
    def is_main(self):
        return self.rank == 0


def check_layout(ctx: int, cp: int, world: int, batch: int, micro_batch: int):
    """Fail fast with a sentence rather than a shape error three layers deep."""
    if cp < 1 or world % cp != 0:
        raise SystemExit(f"error: world size {world} is not divisible by --cp {cp}")
    if ctx % (2 * cp) != 0:
        raise SystemExit(f"error: sequence length must be divisible by 2 x cp = {2 * cp} (got --ctx {ctx})")
    dp = world // cp
    if batch % (dp * micro_batch) != 0:
        raise SystemExit(f"error: --batch {batch} must be a multiple of data-parallel size x micro-batch "
                         f"= {dp} x {micro_batch}")


def setup_distributed(cp: int) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cp == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    if world % cp != 0:
        raise SystemExit(f"error: world size {world} is not divisible by --cp {cp}")
    # ranks r = dp_rank * cp + cp_rank: a cp group is cp consecutive ranks (one node's NVLink, ideally)
    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    fsdp_mesh = init_device_mesh(device.type, (world,))  # parameters are sharded over every rank
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, dp=world // cp, cp=cp,
                dp_rank=mesh["dp"].get_local_rank(), cp_rank=mesh["cp"].get_local_rank(),
                cp_group=mesh["cp"].get_group(), fsdp_mesh=fsdp_mesh)


def print0(d: Dist, *args, **kwargs):
    if d.is_main:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# ----------------------------------------------------------------------------------------------
# the model

def build_model(args, d: Dist, extend_rope: bool = True) -> M.Llama:
    """Load (or create tiny), switch RoPE to the stage-1 scaling (stage 2 keeps the model's own),
    then parallelise from outside."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model:
        model = M.Llama.from_pretrained(args.model, dtype=torch.float32)  # fp32 master weights
    else:
        with torch.device("meta"):
            model = M.Llama(M.preset("tiny"))
        model.to_empty(device="cpu")
        model.set_rope(model.args.rope)
        model.init_weights(seed=args.seed)
    if extend_rope:
        original = args.original_window or model.args.rope.original_max_position
        model.set_rope(rope.extend_settings(model.args.rope, args.ctx, args.rope, original,
                                            beta_fast=args.beta_fast, beta_slow=args.beta_slow))
        model.args.max_seq_len = args.ctx
    if d.cp > 1:
        model.set_attention(partial(attention.ring_attention, group=d.cp_group))
    if args.activation_checkpointing:
        from torch.distributed._composable import checkpoint as activation_checkpoint
        for layer in model.layers:
            activation_checkpoint(layer)  # keeps parameter names; recomputes the block in backward
    if args.compile:
        for layer in model.layers:
            layer.compile()
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=d.fsdp_mesh, mp_policy=mp)
        fully_shard(model, mesh=d.fsdp_mesh, mp_policy=mp)
        for module in [*model.layers, model]:
            module.set_gradient_divide_factor(1.0)  # the loss is already a global mean (see docstring)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model.to(d.device)


def model_tokenizer(args, model: M.Llama):
    """The model's tokenizer; a tiny model from random weights takes the built-in one, whose ids
    go into its config (config.json's bos/eos for serving tools)."""
    tokenizer = data.load_tokenizer(args.model)
    if args.model is None:
        model.args.bos_id, model.args.eos_id = tokenizer.bos_id, list(tokenizer.stop_ids)
    return tokenizer


def label_weights(labels: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Per-conversation loss weighting (sft.py --loss-weighting conversation; LongAlign's for packed
    instruction tuning): each labelled token weighs 1 / (the labelled tokens of its conversation in
    its row), so a one-token answer counts as much as a long one. The weights of a conversation sum
    to 1, so a step's sum is its number of conversations, which the loss is divided by. (B, T) fp32,
    0 where labels are -100. It needs whole rows: the counts of a context-parallel shard would miss
    the other shards' tokens, so sft.py refuses --cp > 1 with it."""
    trained = labels != -100  # (B, T)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None]  # (B, 1)
    key = rows * (int(doc_ids.max()) + 2) + doc_ids + 1  # (B, T): one id per (row, conversation)
    _, inverse, counts = torch.unique(key[trained], return_inverse=True, return_counts=True)
    weights = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    weights[trained] = 1.0 / counts[inverse].float()
    return weights


def get_lr(step: int, args) -> float:
    """Linear warmup over the first `warmup` fraction, cosine down to min_lr_ratio x lr."""
    warmup = max(1, int(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# checkpoints: sharded, atomic, resumable

def checkpoint_dirs(out: str) -> list[str]:
    """Complete checkpoints, oldest first. A directory still named *.tmp was never finished."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = [n for n in os.listdir(root) if n.startswith(CHECKPOINT_PREFIX) and not n.endswith(".tmp")
            and os.path.exists(os.path.join(root, n, "trainer_state.json"))]
    return [os.path.join(root, n) for n in sorted(done)]


def save_checkpoint(out: str, step: int, model, optimizer, loader, d: Dist, keep: int):
    """Every rank writes its own shards (no rank gathers the model) into step_N.tmp; rank 0 adds
    the trainer state and renames the directory only once all ranks have finished."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step:08d}")
    tmp = final + ".tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died earlier
        os.makedirs(tmp)
    barrier(d)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    barrier(d)
    if d.is_main:
        state = {"step": step, "loader": loader.state_dict(), "rng": torch.get_rng_state().tolist()}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def load_checkpoint(path: str, model, optimizer, loader) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer = json.load(f)
    loader.load_state_dict(trainer["loader"])
    torch.set_rng_state(torch.tensor(trainer["rng"], dtype=torch.uint8))
    return trainer["step"]


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def export_hf(model, out: str, tokenizer, d: Dist):
    """Consolidated HF-layout export: transformers and vLLM load it as a normal Llama."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        M.save_hf_checkpoint(os.path.join(out, "hf"), model.args, full, source_dir=model.source_dir,
                             tokenizer=tokenizer)
    barrier(d)


# ----------------------------------------------------------------------------------------------
# throughput

def device_peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> float:
    """Peak FLOP/s for MFU: the override, the datasheet for known GPUs, else a measured matmul."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12)):
            if key in name:
                return tflops if dtype == torch.bfloat16 else tflops / 2
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


# ----------------------------------------------------------------------------------------------
# the memory plan (--plan): what one GPU holds, from the shapes alone

def memory_plan(margs: M.ModelArgs, ctx: int, world: int, cp: int, micro_batch: int = 1,
                compute_bytes: int = 2, activation_checkpointing: bool = True) -> dict[str, float]:
    """Bytes per GPU at the peak of a training step, by component.

    FSDP2 over all `world` ranks keeps fp32 master weights, fp32 gradients and AdamW's two fp32
    moments sharded (16 bytes per parameter / world). Each rank holds T = ctx / cp tokens.
    """
    n = M.count_params(margs)
    d, hd, kv, h, f, v = margs.dim, margs.head_dim, margs.n_kv_heads, margs.n_heads, margs.ffn_dim, margs.vocab_size
    layer_params = (n - margs.vocab_size * d * (1 if margs.tie_embeddings else 2) - d) / margs.n_layers
    t = micro_batch * ctx // cp  # tokens on this rank
    b = compute_bytes
    sharded = world > 1
    plan = {
        "weights, grads, AdamW (fp32, sharded)": 16 * n / world,
        # all-gathered compute copies: current + prefetched layer, and the root's embedding/head
        "unsharded layer params (2 layers)": 2 * layer_params * b if sharded else 0.0,
        "unsharded embedding + head": v * d * b * (1 if margs.tie_embeddings else 2) if sharded else 0.0,
        "unsharded layer grads (fp32 reduce)": layer_params * 4 if sharded else 0.0,
    }
    # what a layer keeps for backward when it is NOT checkpointed: inputs of every matmul/norm
    per_token_layer = b * (4 * d + 2 * h * hd + 2 * kv * hd + 3 * f) + 4 * h  # + fp32 lse
    if activation_checkpointing:
        plan["checkpointed layer inputs"] = margs.n_layers * t * d * b
        plan["one layer recomputed (+ its grads)"] = 1.25 * t * per_token_layer  # grads are transient
    else:
        plan["all layers' activations"] = margs.n_layers * t * per_token_layer
    # attention: fp32 out/lse/dq accumulators, K/V blocks in flight, dK/dV accumulators on the ring
    plan["attention workspace"] = t * (2 * h * hd * 4 + 2 * 2 * kv * hd * b * (2 if cp > 1 else 0)
                                       + 2 * kv * hd * 4 * (2 if cp > 1 else 1))
    chunk = min(t, M.loss_chunk_size(v))
    # one chunk's fp32 logits and softmax-gradient, the head's fp32 gradient, h and its gradient
    plan["loss workspace (chunked)"] = 2 * chunk * v * 4 + v * d * 4 + 2 * t * d * b
    plan["RoPE cos/sin"] = t * hd * (2 * b + 8)
    return plan


def print_plan(args, world: int):
    margs = (M.args_from_hf_config(M.read_hf_config(args.model)) if args.model and os.path.isdir(args.model)
             else M.preset(args.model or "tiny"))
    gpu = rope.parse_size(args.gpu_memory)
    b = 4 if args.dtype == "fp32" else 2
    plan = memory_plan(margs, args.ctx, world, args.cp, args.micro_batch, b, args.activation_checkpointing is not False)
    total = sum(plan.values())
    print(f"memory plan per GPU: {args.model or 'tiny'}, ctx {args.ctx:,}, world {world} = dp {world // args.cp} "
          f"x cp {args.cp}, micro-batch {args.micro_batch}, {'bf16' if b == 2 else 'fp32'} compute")
    for name, nbytes in plan.items():
        print(f"  {name:42s} {nbytes / 2**30:9.2f} GiB")
    print(f"  {'total':42s} {total / 2**30:9.2f} GiB of {gpu / 2**30:.0f} GiB "
          f"({'fits' if total < 0.9 * gpu else 'does NOT fit'}, 10% kept for the allocator)")
    fitting = [cp for cp in range(1, world + 1) if world % cp == 0 and args.ctx % (2 * cp) == 0
               and sum(memory_plan(margs, args.ctx, world, cp, args.micro_batch, b).values()) < 0.9 * gpu]
    print(f"  smallest cp that fits on {world} GPUs: {fitting[0] if fitting else 'none (use more GPUs)'}")
    flops = M.flops_per_token(margs, args.ctx) * args.batch * args.ctx
    peak = (args.peak_tflops or 989) * 1e12
    step_s = flops / (world * peak * args.mfu)
    print(f"  step of {args.batch} x {args.ctx:,} tokens: {flops:.2e} FLOPs, ~{step_s:,.0f} s at {args.mfu:.0%} MFU "
          f"({peak / 1e12:.0f} TFLOP/s per GPU); {args.steps} steps: ~{step_s * args.steps * world / 3600:,.0f} "
          f"GPU-hours")
    return plan


# ----------------------------------------------------------------------------------------------
# the loop (stage 1 and stage 2)

def train(args, model, loader, tokenizer, d: Dist):
    """Run args.steps optimizer steps from wherever the checkpoints say; export at the end."""
    from tqdm import tqdm
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2),
                                  weight_decay=args.weight_decay, eps=1e-8)
    start_step = 0
    if args.resume:
        found = checkpoint_dirs(args.out)
        if not found:
            raise SystemExit(f"error: --resume: no complete checkpoint in {os.path.join(args.out, 'checkpoints')}")
        start_step = load_checkpoint(found[-1], model, optimizer, loader)
        print0(d, f"resumed from {found[-1]} at step {start_step}")
    accum = args.batch // (d.dp * args.micro_batch)
    flops_per_step = M.flops_per_token(model.args, args.ctx) * args.batch * args.ctx
    peak = device_peak_flops(d.device, dtype, args.peak_tflops) * d.world
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if d.is_main and start_step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    batches = iter(loader)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not d.is_main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [{k: v.to(d.device) for k, v in next(batches).items()} for _ in range(accum)]
        labelled = all_reduce_sum(sum((mb["labels"] != -100).sum() for mb in micro_batches), d)
        # the loss is a mean over the step's labelled tokens (every rank and micro-batch), or with
        # per-conversation weighting over its conversations: the divisor is known before any forward
        if args.loss_weighting == "conversation":
            for mb in micro_batches:
                mb["weights"] = label_weights(mb["labels"], mb["doc_ids"])
            count = all_reduce_sum(sum(mb["weights"].sum() for mb in micro_batches), d).clamp(min=1)
        else:
            count = labelled.to(torch.float32).clamp(min=1)
        loss_sum = torch.zeros((), device=d.device)
        # one process keeps fp32 weights and autocasts; several get bf16 compute from FSDP's policy
        autocast = torch.autocast(d.device.type, dtype=dtype) if d.world == 1 and dtype != torch.float32 else nullcontext()
        for mb in micro_batches:
            with autocast:
                token_loss_sum = model(mb["tokens"], labels=mb["labels"], positions=mb["positions"],
                                       doc_ids=mb["doc_ids"] if args.doc_mask else None, reduction="sum",
                                       label_weights=mb.get("weights"))
            (token_loss_sum / count).backward()
            loss_sum += token_loss_sum.detach()
        loss = (all_reduce_sum(loss_sum, d) / count).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not math.isfinite(loss) or not torch.isfinite(grad_norm):
            print0(d, f"error: non-finite loss ({loss}) or grad norm ({float(grad_norm)}) at step {step}; "
                      f"stopping without saving; the last good checkpoint is kept in {args.out}/checkpoints")
            raise SystemExit(1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": int(labelled.item()), "tokens_per_s": args.batch * args.ctx / dt,
                  "mfu": flops_per_step / dt / peak, "peak_mem_gib": peak_memory_gib(d.device),
                  "step_s": dt}
        if d.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.1%}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(args.out, step + 1, model, optimizer, loader, d, args.keep)
    bar.close()
    save_checkpoint(args.out, args.steps, model, optimizer, loader, d, args.keep)
    export_hf(model, args.out, tokenizer, d)
    print0(d, f"done: {args.steps} steps; HF checkpoint in {os.path.join(args.out, 'hf')}, "
              f"metrics in {metrics_path}")


# ----------------------------------------------------------------------------------------------
# stage 1's data

def quiet(*args, **kwargs):
    pass


def stage1_loader(args, tokenizer, d: Dist, log=print):
    if not d.is_main:
        barrier(d)  # rank 0 tokenizes the corpus once; the others then reuse its token file
    token_file = data.build_token_file(args.data, tokenizer, args.cache, log=log if d.is_main else quiet)
    if d.is_main:
        barrier(d)
    budget = args.steps * args.batch * args.ctx
    order = data.sample_by_length(token_file, budget, args.seed, short=args.short_doc, long=args.long_doc,
                                  log=log if d.is_main else quiet)
    dataset = data.PackedDataset(token_file, order, args.ctx, data.separator_ids(tokenizer, args.separator))
    return data.Loader(dataset, args.micro_batch, dp_rank=d.dp_rank, dp_size=d.dp, cp_rank=d.cp_rank,
                       cp_size=d.cp, seed=args.seed)


def prepare(args) -> Dist:
    """Checks that need no model, then the process group. Shared by stage 1 and stage 2."""
    world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(args.ctx, args.cp, world, args.batch, args.micro_batch)
    if args.resume and not checkpoint_dirs(args.out):
        raise SystemExit(f"error: --resume: no complete checkpoint in {os.path.join(args.out, 'checkpoints')}")
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if args.activation_checkpointing is None:
        args.activation_checkpointing = torch.cuda.is_available()
    torch.manual_seed(args.seed)
    return setup_distributed(args.cp)


def run(args):
    if args.tokenize_only:
        data.build_token_file(args.data, data.load_tokenizer(args.model), args.cache)
        return
    if args.plan:
        world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
        check_layout(args.ctx, args.cp, world, args.batch, args.micro_batch)
        print_plan(args, world)
        return
    d = prepare(args)
    model = build_model(args, d)
    tokenizer = model_tokenizer(args, model)
    print0(d, f"model: {M.count_params(model.args) / 1e6:.1f}M parameters, ctx {args.ctx}, "
              f"rope {model.args.rope}, world {d.world} = dp {d.dp} x cp {d.cp}, {args.steps} steps of "
              f"{args.batch} x {args.ctx} tokens")
    loader = stage1_loader(args, tokenizer, d)
    train(args, model, loader, tokenizer, d)
    finish(d)


def finish(d: Dist):
    if d.world > 1:
        dist.destroy_process_group()


def main(argv=None, run=run, parser=build_parser, defaults=fill_defaults):
    try:
        run(defaults(parser().parse_args(argv)))
    except (FileNotFoundError, ValueError) as e:  # bad input: one sentence, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
