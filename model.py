"""Llama 3.1 (and 3.2): ModelArgs and named PRESETS (a `tiny` one for CPU), the modules, one chunked loss (mean,
sum or per token, never full-vocabulary logits), one greedy decoder, strict loading and saving of (sharded)
safetensors in the HF layout. Pure: no process groups, no FSDP; parallelism swaps attention in (set_attention)."""
import json, os, pathlib, shutil
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn

import rope
from attention import chunked_attention
from rope import RopeSettings, UserError

PREFILL_CHUNK = 4096  # prompt tokens per prefill step: attention scores are (chunk x prompt), not (prompt x prompt)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# config.json: our fields' names there; defaults (transformers', Llama 3's ids); math-changing fields' one value
HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "vocab_size": "vocab_size", "ffn_dim": "intermediate_size", "n_kv_heads": "num_key_value_heads",
            "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
            "max_seq_len": "max_position_embeddings", "bos_id": "bos_token_id", "eos_id": "eos_token_id"}
HF_DEFAULTS = {"num_key_value_heads": None, "head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
               "max_position_embeddings": 2048, "bos_token_id": 128000, "eos_token_id": 128001}
HF_LAYER_NAMES = {**{f"attention.w{x}": f"self_attn.{x}_proj" for x in "qkvo"}, "feed_forward.w1": "mlp.gate_proj",
                  "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
                  "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
FIXED_FIELDS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "partial_rotary_factor": 1}

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    head_dim: int | None = None  # None -> dim // n_heads
    tie_embeddings: bool = False
    max_seq_len: int = 131072  # the window; exported as max_position_embeddings
    rope: RopeSettings = field(default_factory=RopeSettings)
    bos_id: int = 128000
    eos_id: int | list[int] = 128001

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

LLAMA31_ROPE = RopeSettings(theta=500000.0, kind="llama3", factor=8.0, original_max_position=8192)
LLAMA32_ROPE = replace(LLAMA31_ROPE, factor=32.0)
PRESETS = {
    "llama3.1-8b": ModelArgs(rope=LLAMA31_ROPE),
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, ffn_dim=28672, rope=LLAMA31_ROPE),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, ffn_dim=8192, tie_embeddings=True, rope=LLAMA32_ROPE),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, ffn_dim=8192, tie_embeddings=True, rope=LLAMA32_ROPE),
    # A few million parameters, trained in minutes on a laptop CPU. Its "original" window is 512 tokens, so
    # 16x-and-more extension shows at a few thousand; vocab 512 = the byte-level tokenizer's 256 bytes + specials.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=512, ffn_dim=704, max_seq_len=512,
                      rope=RopeSettings(theta=10000.0, original_max_position=512), bos_id=256, eos_id=257),
}

def preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], rope=replace(PRESETS[name].rope))

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32 (bf16 squares lose too much), scale in the input dtype, as HF does
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

class KVCache:
    """One layer's keys and values for prompt + new tokens only (Llama 3.1 8B: 128 KiB per token in bf16)."""
    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v, self.length = torch.zeros_like(self.k), 0

    def update(self, k, v):  # append k, v (B, T, KV, D) and return everything cached so far
        start, self.length = self.length, self.length + k.shape[1]
        self.k[:, start:self.length], self.v[:, start:self.length] = k, v  # a shape error if it overflows
        return self.k[:, :self.length], self.v[:, :self.length]

class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim, self.wq = args.head_dim, nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk, self.wv = (nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False) for _ in range(2))
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.attention_fn = chunked_attention  # (q, k, v, causal, doc_ids) -> out; ring attention under cp

    def forward(self, x, cos, sin, doc_ids=None, cache: KVCache | None = None):
        q, k, v = (w(x).unflatten(-1, (-1, self.head_dim)) for w in (self.wq, self.wk, self.wv))  # q (B, T, H, D)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)  # k, v (B, T, KV, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, cached + T, KV, D); queries are the last T positions
        out = self.attention_fn(q, k, v, causal=True, doc_ids=doc_ids)  # (B, T, H, D); GQA: k/v not copied
        return self.wo(out.flatten(2))

class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))  # SwiGLU

class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(args.dim, args.norm_eps), Attention(args)
        self.ffn_norm, self.feed_forward = RMSNorm(args.dim, args.norm_eps), FeedForward(args)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids, cache)
        return x + self.feed_forward(self.ffn_norm(x))

def loss_chunk_size(vocab_size: int) -> int:  # ~128M logits per chunk: 512 MiB in fp32 (1046 tokens for Llama 3)
    return max(1, (1 << 27) // vocab_size)

class ChunkedCrossEntropy(torch.autograd.Function):
    """(sum(losses * token_weights), losses): per-token cross_entropy(h @ weight.T, labels) (N,) fp32, 0 where
    labels are -100, one chunk of logits at a time (fp32 logits of 128K tokens x 128256 vocab: 62 GiB);
    token_weights (N,) or None (1). Gradients of the sum w.r.t. h (N, D) and weight (V, D), if needed, are formed
    here from softmax - onehot (the logits' gradient) and saved (h-, weight-sized): backward recomputes nothing."""
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size: int, token_weights=None):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        losses = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            valid = labels[rows] != -100  # (c,)
            if not valid.any():
                continue
            target = labels[rows].clamp(min=0)
            logits = (h[rows] @ weight.T).float()  # (c, V), the only vocabulary-sized tensor
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            losses[rows] = (lse - logits.gather(1, target[:, None]).squeeze(1)) * valid
            if need_grad:
                scale = valid if token_weights is None else token_weights[rows] * valid  # (c,)
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own memory
                grad_logits[torch.arange(len(target), device=h.device), target] -= 1.0
                grad_logits = (grad_logits * scale[:, None]).to(h.dtype)
                grad_h[rows] = grad_logits @ weight
                grad_w += (grad_logits.T @ h[rows]).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return (losses if token_weights is None else losses * token_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), (grad_w * grad_total).to(ctx.weight_dtype), None, None, None

class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args, self.tok_embeddings = args, nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm, self.output = RMSNorm(args.dim, args.norm_eps), nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.source_dir = None  # where from_pretrained read it: tokenizer files are copied on save
        self.set_rope(args.rope)

    def set_rope(self, settings: RopeSettings):  # e.g. llama3 -> yarn for stage 1
        self.args.rope = settings
        self.inv_freq = rope.inv_freq(settings, self.args.head_dim)  # (D/2,) fp32, no buffer: .to(bf16) leaves it

    def set_attention(self, attention_fn):  # in every layer, e.g. ring attention on a cp group
        for layer in self.layers:
            layer.attention.attention_fn = attention_fn

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None):  # to train from scratch (the tiny preset)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            p.copy_(torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * std)

    def hidden_states(self, tokens, positions=None, doc_ids=None, caches=None):  # -> normalised (B, T, dim)
        if positions is None:  # (1, T), after the cached ones, broadcast over the batch
            start = caches[0].length if caches else 0
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = rope.rope_cos_sin(positions, self.inv_freq, self.args.rope.mscale, h.dtype)  # (B, T, D) each
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, doc_ids, caches[i] if caches else None)
        return self.norm(h)

    def forward(self, tokens, labels=None, positions=None, doc_ids=None, reduction="mean", label_weights=None):
        """tokens (B, T) -> logits (B, T, vocab); with labels (B, T) -> the loss. labels[b, t] is the token that
        should follow tokens[b, t] (-100: not trained on); positions (B, T): the tokens' own (a context-parallel
        shard's are not contiguous), default 0..T-1. reduction: "mean" over labelled tokens; "sum" (to average
        over ranks) of each loss times label_weights (B, T) if given; "none": per-token losses (B, T) fp32."""
        grad = torch.is_grad_enabled() and reduction != "none"
        with torch.set_grad_enabled(grad):
            h = self.hidden_states(tokens, positions, doc_ids)
        if labels is None:
            return self.output(h).float()
        weight = self.output.weight if grad else self.output.weight.detach()  # detached: no gradients formed
        total, losses = ChunkedCrossEntropy.apply(h.flatten(0, 1), weight, labels.flatten(), loss_chunk_size(
            self.args.vocab_size), None if label_weights is None else label_weights.flatten().float())
        if reduction == "none":
            return losses.view(labels.shape)
        return total if reduction == "sum" else total / (labels != -100).sum().clamp(min=1)  # no label: 0, not NaN

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy continuation of one prompt (the new ids, a stop token included), prefilled PREFILL_CHUNK tokens
        at a time into KV caches sized for prompt + new tokens: no (1M, vocab) logits, no (1M, 1M) scores."""
        a, w, n = self.args, self.output.weight, len(prompt) + max_new_tokens
        caches = [KVCache(1, n, a.n_kv_heads, a.head_dim, w.dtype, w.device) for _ in self.layers]
        for chunk in torch.tensor([prompt], device=w.device).split(PREFILL_CHUNK, dim=1):  # (1, <= PREFILL_CHUNK)
            h = self.hidden_states(chunk, caches=caches)
        out = []
        for _ in range(max_new_tokens):
            out.append(int(self.output(h[:, -1]).argmax(-1)))
            if out[-1] in stop_ids or len(out) == max_new_tokens:
                break  # (the last token's own forward step is never needed)
            h = self.hidden_states(torch.tensor([out[-1:]], device=w.device), caches=caches)
        return out

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device="cpu", read_weights: bool = True):
        """Load an HF directory into a meta-device model filled with assign=True: weights exist once in memory.
        read_weights=False checks every name and shape (from the files' headers) but reads no weight: the
        parameters stay on the meta device, for a process that receives them from another (train.py's rank 0)."""
        args = args_from_hf_config(read_hf_config(path), os.path.join(path, "config.json"))
        with torch.device("meta"):
            model = cls(args).to(dtype or torch.get_default_dtype())  # no memory yet, the dtype already
        hf_to_ours, state = {hf: ours for ours, hf in hf_key_map(args).items()}, {}
        for key, shape, read, filename in read_safetensors(path):
            if key == "lm_head.weight" and args.tie_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            if key not in hf_to_ours:
                raise UserError(f"unexpected tensor {key!r} in {filename}: not part of a {args.n_layers}-layer Llama")
            expected = tuple(model.get_parameter(hf_to_ours[key]).shape)
            if shape != expected:
                raise UserError(f"tensor {key!r} in {filename} has shape {shape}, but config.json implies {expected}")
            state[hf_to_ours[key]] = read().to(device=device, dtype=dtype) if read_weights else None
        missing = sorted(hf for hf, ours in hf_to_ours.items() if ours not in state)
        if missing:
            raise UserError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if read_weights:
            model.load_state_dict(state, strict=not args.tie_embeddings, assign=True)
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight  # assign=True replaced the shared one
        model.set_rope(args.rope)  # inv_freq computed here, off the meta device, on every process alike
        model.source_dir = path
        return model

    def save_pretrained(self, path: str, max_shard_bytes: int = 5 << 30, tokenizer=None):
        save_hf_checkpoint(path, self.args, self.state_dict(), self.source_dir, max_shard_bytes, tokenizer)

def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{config_path} is missing: a model directory needs config.json")
    try:
        return json.loads(pathlib.Path(config_path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from None

def args_from_hf_config(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from config.json; a missing required field or an unimplemented FIXED_FIELDS value is named."""
    if config.get("model_type") != "llama":
        raise UserError(f"model_type {config.get('model_type')!r} in {source} is not supported: this loads Llama only")
    for name, value in FIXED_FIELDS.items():
        if config.get(name, value) != value:
            raise UserError(f"{name} {config[name]!r} in {source} is not supported; this Llama implements {value!r}")
    missing = [name for name in HF_NAMES.values() if name not in HF_DEFAULTS and config.get(name) is None]
    if missing:
        raise UserError(f"{source} lacks {missing[0]!r}, which a Llama config needs")
    values = {ours: config.get(name, HF_DEFAULTS.get(name)) for ours, name in HF_NAMES.items()}
    values["n_kv_heads"] = values["n_kv_heads"] or values["n_heads"]
    return ModelArgs(**values, rope=rope.from_hf(config, source))

def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    # max_position_embeddings = our window: serving engines refuse longer requests without overrides
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **FIXED_FIELDS,
            **{name: getattr(args, ours) for ours, name in HF_NAMES.items()},
            **rope.to_hf(args.rope, args.head_dim), "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True}

def hf_key_map(args: ModelArgs) -> dict[str, str]:  # our parameter names -> the Hugging Face names
    keys = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            **({} if args.tie_embeddings else {"output.weight": "lm_head.weight"})}
    return keys | {f"layers.{i}.{ours}.weight": f"model.layers.{i}.{hf}.weight"
                   for i in range(args.n_layers) for ours, hf in HF_LAYER_NAMES.items()}

def read_safetensors(path: str):
    """Yield (name, shape, read, filename) from model.safetensors or an index's shards, one tensor at a time: the
    shape is the file's header's, read() maps that one tensor (mmap), so checking a checkpoint reads no weight."""
    from safetensors import safe_open
    index = pathlib.Path(path, "model.safetensors.index.json")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    for full in (os.path.join(path, filename) for filename in shards or ["model.safetensors"]):
        if not os.path.exists(full):
            raise UserError(f"shard {full} listed in {index.name} is missing" if shards else
                            f"{path} has no weights: neither model.safetensors nor {index.name}")
        with safe_open(full, framework="pt") as f:
            for key in f.keys():
                yield key, tuple(f.get_slice(key).get_shape()), partial(f.get_tensor, key), full

def save_hf_checkpoint(path: str, args: ModelArgs, state_dict: dict, source_dir: str | None = None,
                       max_shard_bytes: int = 5 << 30, tokenizer=None):
    """Write safetensors (sharded with an index above max_shard_bytes), the tokenizer files, and config.json last,
    so that it marks a complete export; weights and config go through atomic_write."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    for stale in [*pathlib.Path(path).glob("model*.safetensors"), *pathlib.Path(path).glob("model*.index.json")]:
        stale.unlink()  # a previous export with another shard count must not linger
    ours_to_hf = hf_key_map(args)
    tensors = {ours_to_hf[k]: v.detach().contiguous().cpu() for k, v in state_dict.items() if k in ours_to_hf}
    shards, size = [{}], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t, size + t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        atomic_write(os.path.join(path, filename), lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, filename))
    if len(shards) > 1:
        write_json(os.path.join(path, "model.safetensors.index.json"),
                   {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map})
    for name in TOKENIZER_FILES if source_dir and os.path.abspath(source_dir) != os.path.abspath(path) else ():
        if os.path.exists(os.path.join(source_dir, name)):
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(path, name))
    if tokenizer is not None:  # written after the copy: it may carry a chat template the source lacked
        tokenizer.save(path)
    write_json(os.path.join(path, "config.json"), hf_config(args, tensors["model.embed_tokens.weight"].dtype))

def write_json(path: str, obj):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))

def atomic_write(path: str, write):
    """The one atomic write: write(tmp) fills a file beside `path`, renamed over it once complete (or removed)."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def count_params(args: ModelArgs, embeddings: bool = True) -> int:
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    total = args.n_layers * (attn + 3 * args.dim * args.ffn_dim + 2 * args.dim) + args.dim  # + the norms
    return total + (args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) if embeddings else 0)

def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per matmul parameter plus
    attention's quadratic term 12 * layers * heads * head_dim * (average context: seq_len / 2, causal)."""
    matmul_params = count_params(args, embeddings=False) - args.n_layers * 2 * args.dim - args.dim
    matmul_params += args.vocab_size * args.dim  # the output head (the embedding lookup is free)
    return 6 * matmul_params + 12 * args.n_layers * args.n_heads * args.head_dim * (seq_len / 2)
