"""Stage 1 of the recipe: continued pretraining on long packed documents under YaRN.

    python train.py                                  # tiny model, built-in corpus, CPU, ~2 minutes
    torchrun --nproc_per_node 8 train.py --ctx 1M --cp 8 --model Llama-3.1-8B-Instruct --data 'corpus/*.jsonl'

One flat loop (nanoGPT-style), which sft.py runs too, parallelised with what PyTorch ships: torchrun, a
(dp, cp) DeviceMesh, FSDP2 `fully_shard` per layer over all ranks, per-layer activation checkpointing,
and ring attention (attention.py) on the cp sub-group."""
import argparse, errno, fcntl, glob, json, math, os, pathlib, resource, shutil, signal, socket, sys, time, warnings, zlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

import attention, data
import model as M
import rope
from rope import UserError

# The optimiser and its schedule are ProLong's (the paper publishes only the peak learning rate):
LR_WARMUP, MIN_LR_RATIO = 0.1, 0.1  # linear warmup over 10% of the steps, then a cosine down to 0.1 x the peak
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0
YARN_BETAS = (4.0, 1.0)  # (beta_fast, beta_slow): the paper's YaRN beta = 4, alpha = 1 (RECIPE.md)
KEEP = 2  # complete checkpoints kept: the newest, and one more in case the newest is unreadable
DISK_FULL = 64 * 2 ** 20  # bytes free under which a failed write is taken for a full disk
# What may change between the launches of one run; any other option unlike --out's run.json: another run
RELAUNCH_FREE = {"out", "resume", "steps", "tokens", "save_every", "compile", "activation_checkpointing", "cache",
                 "skip_bad", "plan", "world", "tokenize_only", "cp", "micro_batch", "heldout"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense bf16, from the datasheets (fp32 runs TF32: half)
PLAN_MFU, PLAN_GPU_MEMORY = 0.4, 80 * 2 ** 30  # --plan assumes 40% MFU and, away from a GPU, an 80 GiB H100

# --- Command line ---------------------------------------------------------------------------------
def common_parser(description: str) -> argparse.ArgumentParser:  # the loop's options: stage 1's and stage 2's
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="HF-layout model directory (absent: the tiny preset)")
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, hf/ export)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree; data parallel = world / cp")
    p.add_argument("--batch", type=int, help="global batch in sequences")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per forward")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="peak learning rate (linear warmup, then cosine to 0.1 x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="default: on GPUs")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", nargs="?", const="auto", default="auto", help="auto (default): continue this "
                   "run's newest good checkpoint in --out, if any; or the path of a checkpoint to continue from")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    p.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, help="attend within each document only")
    p.set_defaults(loss_weighting="token", world=None)  # options of one stage only
    return p

def build_parser() -> argparse.ArgumentParser:
    p = common_parser("Stage 1: continued pretraining with YaRN on long packed documents (see README)")
    p.set_defaults(out="out/train", doc_mask=False)  # the paper's stage 1 attends across documents
    p.add_argument("--data", nargs="*", help="files, directories or globs (absent: the built-in corpus)")
    p.add_argument("--cache", default=".cache/tokens", help="where tokenized corpora are kept and reused")
    p.add_argument("--ctx", help="window to train at, e.g. 4K or 1M (default: 1M, tiny: 4K)")
    p.add_argument("--tokens", help="token budget, e.g. 1G (the paper: 1B); sets --steps")
    p.add_argument("--rope", default="yarn", choices=["yarn", "ntk", "llama3", "none"])
    p.add_argument("--original-window", help="the pre-training window YaRN scales from (default: the model's)")
    p.add_argument("--separator", default="<s>", help="document separator: '<s>' (paper), bos, eos or none")
    p.add_argument("--tokenize-only", action="store_true", help="tokenize --data into --cache (once, before many nodes)")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit (builds nothing)")
    p.add_argument("--world", type=int, help="world size for --plan (default: the current one)")
    return p

def fill_defaults(args):  # the paper's stage 1 when --model is given; the same recipe scaled down for the tiny demo
    tiny = args.model is None
    args.ctx = rope.parse_size(args.ctx or ("4K" if tiny else "1M"))
    args.original_window = rope.parse_size(args.original_window) if args.original_window else None
    args.lr = (1e-3 if tiny else 3e-5) if args.lr is None else args.lr
    args.batch = 2 if args.batch is None else args.batch
    tokens = rope.parse_size(args.tokens) if args.tokens else 10 ** 9  # the paper's 1B tokens
    check_flags(args, "--ctx", [("--tokens", tokens, 1), ("--original-window", args.original_window or 1, 1)])
    if args.steps is None:
        args.steps = 32 if tiny and not args.tokens else math.ceil(tokens / (args.batch * args.ctx))
    return args

def check_flags(args, ctx_flag: str, more=()):  # a bad value refused, naming its flag, before anything loads
    world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
    steps = 1 if args.steps is None else args.steps  # None: train.py derives it from --tokens
    for flag, value, least in [(ctx_flag, args.ctx, 1), ("--cp", args.cp, 1), ("--batch", args.batch, 1),
                               ("--world", world, 1), ("--micro-batch", args.micro_batch, 1), ("--steps", steps, 1),
                               *more, ("--save-every", args.save_every, 0)]:  # more: (flag, value, least)
        if value < least:
            raise UserError(f"{flag} must be at least {least}, not {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be a positive number, not {args.lr}")
    if world % args.cp != 0:
        raise UserError(f"world size {world} is not divisible by --cp {args.cp}")
    if args.ctx % (2 * args.cp) != 0:
        raise UserError(f"sequence length must be divisible by 2 x cp = {2 * args.cp} (got {ctx_flag} {args.ctx})")
    if args.batch % (world // args.cp * args.micro_batch) != 0:
        raise UserError(f"--batch {args.batch} must be a multiple of data-parallel size x micro-batch "
                        f"= {world // args.cp} x {args.micro_batch}")
    if args.resume != "auto" and not os.path.isfile(os.path.join(args.resume, "trainer_state.json")):
        raise UserError(f"--resume {args.resume}: no complete checkpoint there")

# --- Distributed setup ----------------------------------------------------------------------------
@dataclass
class Dist:  # this process's place: rank of world = dp x cp, its device, its dp and cp coordinates and groups
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dp: int = 1
    cp: int = 1
    dp_rank: int = 0
    cp_rank: int = 0
    cp_group: object = None
    fsdp_mesh: object = None  # every rank: parameters are sharded over all of them
    lock: object = None  # rank 0's open lock file of --out, held for the whole launch
    is_main = property(lambda self: self.rank == 0)

def setup_distributed(cp: int) -> Dist:
    """Joins torchrun's process group (NCCL on GPUs, gloo on CPU) and its (dp, cp) mesh; alone, nothing."""
    world, cuda = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available()
    if world == 1 and cp == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # the store torchrun shares with its workers outlives a group and keeps its keys: a restarted group can read
        # the dead group's addresses (gloo: connectFullMesh refused, or a hang; NCCL: a stale unique id)
        raise UserError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, so that "
                        "each restart gets a new store (see the README's full-scale launch)")
    from torch.distributed.device_mesh import init_device_mesh
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    # ranks r = dp_rank * cp + cp_rank: a cp group is cp consecutive ranks (one node's NVLink, ideally)
    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return Dist(dist.get_rank(), world, device, world // cp, cp, mesh["dp"].get_local_rank(),
                mesh["cp"].get_local_rank(), mesh["cp"].get_group(), init_device_mesh(device.type, (world,)))

def print0(d: Dist, *args, **kwargs):
    if d.is_main:
        print(*args, **kwargs, flush=True)

def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value

def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()

# --- The model, its loss weights and its learning rate --------------------------------------------
def build_model(args, d: Dist, extend_rope: bool = True) -> M.Llama:
    """Loads (or creates tiny), switches RoPE to the stage-1 scaling (stage 2 keeps the model's own),
    then parallelises from outside: ring attention, activation checkpointing, compile, FSDP2."""
    if args.model:  # fp32 master weights, read by rank 0 alone; the other ranks check names and shapes, stay on meta
        model = M.Llama.from_pretrained(args.model, dtype=torch.float32, read_weights=d.is_main)
    else:
        model = M.Llama(M.preset("tiny"))
        model.init_weights(seed=args.seed)
    if extend_rope:
        model.set_rope(rope.extend_settings(model.args.rope, args.ctx, args.rope, args.original_window, *YARN_BETAS))
        model.args.max_seq_len = args.ctx
    if d.cp > 1:
        model.set_attention(partial(attention.ring_attention, group=d.cp_group))
    for layer in model.layers:
        if args.activation_checkpointing:
            from torch.distributed._composable import checkpoint
            checkpoint(layer)  # keeps parameter names; recomputes the block in backward
        if args.compile:
            layer.compile()
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        full = model.state_dict() if d.is_main else None  # rank 0's weights: fully_shard keeps its shard of them
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[args.dtype], reduce_dtype=torch.float32)
        for module in [*model.layers, model]:  # each layer, then the root (embedding, norm, head)
            fully_shard(module, mesh=d.fsdp_mesh, mp_policy=mp)
            module.set_gradient_divide_factor(1.0)  # the loss is already a global mean (loss_divisor)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
        if args.model:
            weights_from_rank0(model, full, d.device)
    return model.to(d.device)

def weights_from_rank0(model, full: dict | None, device: torch.device):
    """Rank 0's full state dict (None elsewhere: a model on the meta device) into every rank's model, one tensor at
    a time: broadcast, then each rank keeps its FSDP shard of it (an unsharded model, as in eval.py: all of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if full is None:
        model.to_empty(device=device)  # allocated here, filled below
        if model.args.tie_embeddings:  # to_empty gives an unsharded model's shared matrix two copies
            model.output.weight = model.tok_embeddings.weight
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

def model_tokenizer(args, model: M.Llama):  # a tiny model takes the built-in one; its bos/eos go into config.json
    tokenizer = data.load_tokenizer(args.model)
    if args.model is None:
        model.args.bos_id, model.args.eos_id = tokenizer.bos_id, list(tokenizer.stop_ids)
    return tokenizer

def label_weights(labels: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 weights of sft.py --loss-weighting conversation (LongAlign's): a labelled token weighs
    1 / (the labelled tokens of its conversation in its row), so a one-token answer counts as much as a
    long one, and a step's weights sum to its number of conversations. Needs whole rows (--cp 1)."""
    trained = labels != -100  # (B, T)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None]  # (B, 1)
    key = rows * (int(doc_ids.max()) + 2) + doc_ids + 1  # (B, T): one id per (row, conversation)
    _, inverse, counts = torch.unique(key[trained], return_inverse=True, return_counts=True)
    weights = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    weights[trained] = 1.0 / counts[inverse].float()
    return weights

def get_lr(step: int, args) -> float:
    warmup = max(1, int(LR_WARMUP * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))

# --- The output folder: one run per --out, one launch at a time; checkpoints verified on load ---------
def claim_out(args, d: Dist):
    """One command line for the first launch and every requeue: rank 0 locks --out, whose run.json tells this run
    from another (refused); args.resume becomes the newest good checkpoint, or None (start fresh)."""
    run_file, metrics = os.path.join(args.out, "run.json"), os.path.join(args.out, "metrics.jsonl")
    if d.is_main:
        lock_out(args.out, d)
    mine = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in RELAUNCH_FREE}))
    saved = json.loads(pathlib.Path(run_file).read_text()) if os.path.isfile(run_file) else None
    differ = [k for k in mine if saved is None or saved.get(k) != mine[k]]
    if args.resume == "auto" and checkpoint_dirs(args.out) and differ:
        what = "it has no run.json" if saved is None else ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)} there, {mine[k]} here" for k in differ)
        raise UserError(f"{args.out} holds the checkpoints of another run ({what}): use another --out, or "
                        f"delete {os.path.join(args.out, 'checkpoints')} to start over there")
    args.resume, state = pick_checkpoint(args, d)
    if state.get("step", 0) > args.steps:
        raise UserError(f"--steps {args.steps} is below the step of {args.resume} ({state['step']})")
    args.data_steps = saved["steps"] if args.resume and not differ else args.steps  # the data's token budget
    if d.is_main:
        M.write_json(run_file, {**mine, "steps": args.data_steps})
        if os.path.exists(metrics):  # the rows of the steps after the checkpoint are to be trained again
            os.truncate(metrics, state.get("metrics_bytes", 0))
    barrier(d)

def lock_out(out: str, d: Dist):
    """An flock (the kernel frees it when its holder dies, even by SIGKILL) on a file naming the holder."""
    os.makedirs(out, exist_ok=True)
    d.lock = open(os.path.join(out, "lock"), "a+")
    try:
        fcntl.flock(d.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{out} is in use by another launch ({pathlib.Path(d.lock.name).read_text().strip()}); "
                        "wait for it to end, or use another --out") from None
    d.lock.truncate(0)
    print(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}",
          file=d.lock, flush=True)
    for tmp in glob.glob(os.path.join(glob.escape(out), "checkpoints", "step_*.tmp")):
        print(f"removing {tmp}: a save that a dead launch left unfinished")
        shutil.rmtree(tmp, ignore_errors=True)

def checkpoint_dirs(out: str) -> list[str]:  # complete checkpoints, oldest first (a step_N.tmp was never finished)
    paths = glob.glob(os.path.join(glob.escape(out), "checkpoints", "step_*[0-9]"))
    return sorted(p for p in paths if os.path.exists(os.path.join(p, "trainer_state.json")))

def pick_checkpoint(args, d: Dist) -> tuple[str | None, dict]:
    """--resume PATH, which must be good, or (auto) the newest good one in --out (a damaged one is named and skipped),
    or None; with its trainer state. Good: every file has its saved size and CRC-32 (a torn shard loads as NaNs)."""
    candidates = checkpoint_dirs(args.out)[::-1] if args.resume == "auto" else [args.resume]
    for path in candidates:
        try:
            state, got = json.loads(pathlib.Path(path, "trainer_state.json").read_text()), file_sums(path, d)
            problem = next((f"{name} is {got.get(name, 'missing')} but {sums} (bytes, CRC-32) was saved"
                            for name, sums in state.get("files", {}).items() if got.get(name) != sums), None)
        except (OSError, ValueError, KeyError) as e:
            problem = f"its trainer_state.json is unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return path, state
        if args.resume != "auto":
            raise UserError(f"checkpoint {path} is damaged: {problem}")
        print0(d, f"warning: skipping checkpoint {path}, which is damaged: {problem}")
    if candidates:
        raise UserError(f"every checkpoint in {os.path.join(args.out, 'checkpoints')} is damaged; "
                        "pass --resume PATH to pick one, or use another --out")
    return None, {}

def file_sums(path: str, d: Dist) -> dict[str, list[int]]:
    """{file: [bytes, CRC-32]} of a checkpoint's shards, rank r reading every world-th file (CRC-32: ~7 GiB/s)."""
    mine = {}
    for name in sorted(n for n in os.listdir(path) if n != "trainer_state.json")[d.rank :: d.world]:
        with open(os.path.join(path, name), "rb") as f:
            sums = [0, 0]
            while chunk := f.read(1 << 26):
                sums = [sums[0] + len(chunk), zlib.crc32(chunk, sums[1])]
        mine[name] = sums
    everyone = [mine] * d.world
    if d.world > 1:
        dist.all_gather_object(everyone, mine)
    return {name: sums for part in everyone for name, sums in part.items()}

def sharded_state(path: str, model, optimizer, d: Dist, load: bool = False):
    """Saves (or loads) the model's and AdamW's shards with torch.distributed.checkpoint, each rank its
    own. One process says so (no_dist); torch then still warns that it assumes so, which is not shown."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        (dcp.load if load else dcp.save)(state, checkpoint_id=path, no_dist=d.world == 1)
    if load:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

def disk_full(e: BaseException, path: str) -> bool:  # torch's zip writer says `unexpected pos 704 vs 598`
    codes = {getattr(x, "errno", None) for x in (e, e.__cause__, e.__context__)}
    while not os.path.exists(path):  # the nearest folder that exists is on the same disk
        path = os.path.dirname(os.path.abspath(path))
    return bool(codes & {errno.ENOSPC, errno.EDQUOT}) or shutil.disk_usage(path).free < DISK_FULL

def save_checkpoint(out: str, step: int, model, optimizer, loader, args, d: Dist):
    """Every rank writes its own shards (no rank gathers the model) into step_N.tmp; rank 0 adds the trainer
    state with each file's size and CRC-32, renames the directory once all ranks have finished, then prunes."""
    final = os.path.join(out, "checkpoints", f"step_{step:08d}")
    tmp = final + ".tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died earlier
        os.makedirs(tmp)
    barrier(d)
    try:
        sharded_state(tmp, model, optimizer, d)
        barrier(d)
        state = {"step": step, "steps": args.steps, "loader": loader.state_dict(), "rng": torch.get_rng_state().tolist(),
                 "files": file_sums(tmp, d)}
        if d.is_main:  # metrics.jsonl's length at this step: a resume cuts it back to this
            metrics = os.path.join(out, "metrics.jsonl")
            state["metrics_bytes"] = os.path.getsize(metrics) if os.path.exists(metrics) else 0
            M.write_json(os.path.join(tmp, "trainer_state.json"), state)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e, out):
            raise UserError(f"the disk holding {out} is full: step {step}'s checkpoint could not be written and "
                            "was removed (the previous ones are intact); free space and run the same command") from None
        raise
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)  # a resumed-from-older run saves this step again
        os.replace(tmp, final)
        dirs = checkpoint_dirs(out)
        steps_of = {c: int(c.rsplit("_", 1)[1]) for c in dirs}  # a later step: an older resume replaced it
        for old in [c for c in dirs if steps_of[c] > step] + [c for c in dirs if steps_of[c] <= step][:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)

def load_checkpoint(args, model, optimizer, loader, d: Dist) -> int:  # restores args.resume; returns its step, or 0
    if not args.resume:
        return 0
    sharded_state(args.resume, model, optimizer, d, load=True)
    saved = json.loads(pathlib.Path(args.resume, "trainer_state.json").read_text())
    loader.load_state_dict(saved["loader"])
    torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))
    start, before = saved["step"], argparse.Namespace(**{**vars(args), "steps": saved["steps"]})
    print0(d, f"resumed from {args.resume} at step {start}" + ("" if before.steps == args.steps else f"; the schedule "
           f"now ends at step {args.steps}, not {before.steps}: lr at step {start + 1} is {get_lr(start, args):.3g}, "
           f"not {get_lr(start, before):.3g}"))
    return start

def export_hf(model, out: str, tokenizer, d: Dist):  # consolidated HF layout: transformers and vLLM load it as a Llama
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        M.save_hf_checkpoint(os.path.join(out, "hf"), model.args, full, model.source_dir, tokenizer=tokenizer)
    barrier(d)

# --- Throughput, and the memory plan (--plan): what one GPU holds, from the shapes alone ----------
def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """A GPU's datasheet peak FLOP/s, for MFU; None where it is not known (a CPU has no figure worth
    dividing by: one timed matmul on a busy machine gave MFUs over 100%)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    tflops = next((t for key, t in PEAK_TFLOPS.items() if key in name), None)
    return tflops and tflops * 1e12 / (1 if dtype == torch.bfloat16 else 2)

def peak_memory_gib(device: torch.device) -> float:
    return (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # ru_maxrss: KiB

def memory_plan(margs: M.ModelArgs, ctx: int, world: int, cp: int, micro_batch: int = 1,
                compute_bytes: int = 2, activation_checkpointing: bool = True) -> dict[str, float]:
    """Bytes per GPU at the peak of a training step, by component. FSDP2 over all `world` ranks shards fp32
    weights, gradients and AdamW's two moments (16 bytes per parameter / world); T = ctx / cp tokens per rank."""
    n = M.count_params(margs)
    d, hd, kv, h, f, v = margs.dim, margs.head_dim, margs.n_kv_heads, margs.n_heads, margs.ffn_dim, margs.vocab_size
    heads = 1 if margs.tie_embeddings else 2  # embedding and output head, or one tied matrix
    layer_params = (n - v * d * heads - d) / margs.n_layers
    t, b, sharded = micro_batch * ctx // cp, compute_bytes, world > 1  # t: tokens on this rank
    plan = {"weights, grads, AdamW (fp32, sharded)": 16 * n / world,
            # all-gathered compute copies: current + prefetched layer, and the root's embedding/head
            "unsharded layer params (2 layers)": 2 * layer_params * b if sharded else 0.0,
            "unsharded embedding + head": v * d * b * heads if sharded else 0.0,
            "unsharded layer grads (fp32 reduce)": layer_params * 4 if sharded else 0.0}
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
    # one chunk's fp32 logits and softmax-gradient, the head's fp32 gradient, h and its gradient
    plan["loss workspace (chunked)"] = 2 * min(t, M.loss_chunk_size(v)) * v * 4 + v * d * 4 + 2 * t * d * b
    plan["RoPE cos/sin"] = t * hd * (2 * b + 8)
    return plan

def print_plan(args, world: int):
    """--plan: the memory plan against this GPU's memory (away from one: an 80 GiB H100's), and the time."""
    margs = (M.args_from_hf_config(M.read_hf_config(args.model)) if args.model and os.path.isdir(args.model)
             else M.preset(args.model or "tiny"))
    on_gpu, b = torch.cuda.is_available(), 4 if args.dtype == "fp32" else 2
    gpu = torch.cuda.get_device_properties(0).total_memory if on_gpu else PLAN_GPU_MEMORY
    plan = memory_plan(margs, args.ctx, world, args.cp, args.micro_batch, b, args.activation_checkpointing is not False)
    total = sum(plan.values())
    print(f"memory plan per GPU: {args.model or 'tiny'}, ctx {args.ctx:,}, world {world} = dp {world // args.cp} "
          f"x cp {args.cp}, micro-batch {args.micro_batch}, {'bf16' if b == 2 else 'fp32'} compute")
    for name, nbytes in [*plan.items(), ("total", total)]:
        print(f"  {name:42s} {nbytes / 2**30:9.2f} GiB")
    print(f"  of {gpu / 2**30:.0f} GiB: {'fits' if total < 0.9 * gpu else 'does NOT fit'} (10% kept for the allocator)")
    fitting = [cp for cp in range(1, world + 1) if world % cp == 0 and args.ctx % (2 * cp) == 0
               and sum(memory_plan(margs, args.ctx, world, cp, args.micro_batch, b).values()) < 0.9 * gpu]
    print(f"  smallest cp that fits on {world} GPUs: {fitting[0] if fitting else 'none (use more GPUs)'}")
    flops = M.flops_per_token(margs, args.ctx) * args.batch * args.ctx
    peak = (on_gpu and peak_flops(torch.device("cuda"), torch.bfloat16)) or PEAK_TFLOPS["H100"] * 1e12
    step_s = flops / (world * peak * PLAN_MFU)
    print(f"  step of {args.batch} x {args.ctx:,} tokens: {flops:.2e} FLOPs, ~{step_s:,.0f} s at {PLAN_MFU:.0%} MFU "
          f"({peak / 1e12:.0f} TFLOP/s per GPU); {args.steps} steps: ~{step_s * args.steps * world / 3600:,.0f} GPU-hours")

# --- The loop (stage 1 and stage 2) ---------------------------------------------------------------
def loss_divisor(micro_batches: list[dict], args, d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(divisor, labelled tokens) of one step: the labelled tokens of all ranks and micro-batches, all-reduced
    before the first forward; each micro-batch's loss is its SUM of token losses / divisor. FSDP sums gradients
    over ranks (divide factor 1): the update is the gradient of the global mean over tokens, and a shard without
    labelled tokens adds zero, never NaN. Weighted by conversation, the divisor counts conversations."""
    labelled = all_reduce_sum(sum((mb["labels"] != -100).sum() for mb in micro_batches), d)
    if args.loss_weighting != "conversation":
        return labelled.to(torch.float32).clamp(min=1), labelled
    for mb in micro_batches:
        mb["weights"] = label_weights(mb["labels"], mb["doc_ids"])
    return all_reduce_sum(sum(mb["weights"].sum() for mb in micro_batches), d).clamp(min=1), labelled

def optimizer_step(model, optimizer, micro_batches: list[dict], divisor: torch.Tensor, step: int, args, d: Dist):
    """Forward and backward of every micro-batch (the gradients accumulate), then one clipped AdamW
    step. Returns the step's loss and gradient norm; a non-finite one stops the run, unsaved."""
    # one process keeps fp32 weights and autocasts; several get bf16 compute from FSDP's policy
    autocast = torch.autocast(d.device.type, DTYPES[args.dtype], enabled=d.world == 1 and args.dtype == "bf16")
    loss_sum = torch.zeros((), device=d.device)
    for mb in micro_batches:
        with autocast:
            token_loss_sum = model(mb["tokens"], labels=mb["labels"], positions=mb["positions"],
                                   doc_ids=mb["doc_ids"] if args.doc_mask else None, reduction="sum",
                                   label_weights=mb.get("weights"))
        (token_loss_sum / divisor).backward()
        loss_sum += token_loss_sum.detach()
    loss = (all_reduce_sum(loss_sum, d) / divisor).item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        print0(d, f"error: non-finite loss ({loss}) or grad norm ({grad_norm}) at step {step + 1}; stopping without saving; "
                  f"the last good checkpoint is kept in {args.out}/checkpoints")
        raise SystemExit(1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm

def train(args, model, dataset, tokenizer, d: Dist):
    """args.steps optimizer steps from args.resume's checkpoint (or 0), then the export. SIGTERM (SLURM's and
    Kubernetes' warning before the kill) or SIGUSR1 (SLURM's --signal): save after this step and end cleanly."""
    from tqdm import tqdm
    loader = data.Loader(dataset, args.micro_batch, dp_rank=d.dp_rank, dp_size=d.dp, cp_rank=d.cp_rank,
                         cp_size=d.cp, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=1e-8)
    start = load_checkpoint(args, model, optimizer, loader, d)
    stop = []  # signals received here; all ranks stop after the same step (a signal in the last one: no stop)
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, lambda n, frame: stop.append(signal.Signals(n).name))
    accum, stopping = args.batch // (d.dp * args.micro_batch), False
    flops_per_step = M.flops_per_token(model.args, args.ctx) * args.batch * args.ctx
    peak = peak_flops(d.device, DTYPES[args.dtype])
    metrics, batches = os.path.join(args.out, "metrics.jsonl"), iter(loader)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not d.is_main, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [{k: v.to(d.device) for k, v in next(batches).items()} for _ in range(accum)]
        divisor, labelled = loss_divisor(micro_batches, args, d)
        loss, grad_norm = optimizer_step(model, optimizer, micro_batches, divisor, step, args, d)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(labelled),
                  "tokens_per_s": args.batch * args.ctx / dt, "step_s": dt, "peak_mem_gib": peak_memory_gib(d.device),
                  "mfu": flops_per_step / dt / (peak * d.world) if peak else None}  # None: no known peak
        if d.is_main:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
        stopping = step + 1 < args.steps and all_reduce_sum(torch.tensor(float(len(stop)), device=d.device), d) > 0
        if stopping or step + 1 < args.steps and args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.out, step + 1, model, optimizer, loader, args, d)
        if stopping:
            break
    bar.close()
    if stopping:
        print0(d, f"stopped by {stop[0] if stop else 'a signal to another rank'} after step {step + 1} of "
                  f"{args.steps}: checkpoint saved in {args.out}; run the same command to continue")
    else:
        save_checkpoint(args.out, args.steps, model, optimizer, loader, args, d)
        export_hf(model, args.out, tokenizer, d)
        print0(d, f"done: {args.steps} steps; HF checkpoint in {os.path.join(args.out, 'hf')}, metrics in {metrics}")
    if d.world > 1:
        dist.destroy_process_group()
    return not stopping

# --- Stage 1's data, and the entry point sft.py shares ---------------------------------------------
def stage1_data(args, tokenizer, d: Dist) -> data.PackedDataset:
    """Rank 0 tokenizes the corpus once (the others wait, then reuse its token file); every rank samples
    the same documents by length and packs them with the separator."""
    log = print if d.is_main else None
    if not d.is_main:
        barrier(d)
    token_file = data.build_token_file(args.data, tokenizer, args.cache, skip_bad=args.skip_bad, log=log)
    if d.is_main:
        barrier(d)
    order = data.sample_by_length(token_file, args.data_steps * args.batch * args.ctx, args.seed, log=log)
    return data.PackedDataset(token_file, order, args.ctx, data.separator_ids(tokenizer, args.separator))

def prepare(args) -> Dist:  # the device's defaults, the seed, the process group; stages 1 and 2
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.activation_checkpointing is None:
        args.activation_checkpointing = torch.cuda.is_available()
    torch.manual_seed(args.seed)
    return setup_distributed(args.cp)

def run(args):
    if args.tokenize_only:
        tokenizer = data.load_tokenizer(args.model)  # --skip-bad too: the training run reuses the same token file
        return data.build_token_file(args.data, tokenizer, args.cache, skip_bad=args.skip_bad)
    if args.plan:
        return print_plan(args, args.world or int(os.environ.get("WORLD_SIZE", "1")))
    d = prepare(args)
    model = build_model(args, d)
    tokenizer = model_tokenizer(args, model)
    claim_out(args, d)  # after the model loaded: a bad --model leaves no --out behind
    print0(d, f"model: {M.count_params(model.args) / 1e6:.1f}M parameters, ctx {args.ctx}, rope {model.args.rope}, "
              f"world {d.world} = dp {d.dp} x cp {d.cp}, {args.steps} steps of {args.batch} x {args.ctx} tokens")
    train(args, model, stage1_data(args, tokenizer, d), tokenizer, d)

def main(argv=None, run=run, parser=build_parser, defaults=fill_defaults):
    """A user's mistake, or a full disk anywhere (token cache, metrics, export), is one sentence and exit 2."""
    args = parser().parse_args(argv)
    try:
        return run(defaults(args))
    except (UserError, FileNotFoundError) as e:
        sentence = str(e)
    except OSError as e:
        if not disk_full(e, args.out):
            raise
        sentence = f"the disk holding {e.filename or args.out} is full ({e.strerror}): free space and run the same command"
    print(f"error: {sentence}", file=sys.stderr)
    raise SystemExit(2)

if __name__ == "__main__":
    main()
