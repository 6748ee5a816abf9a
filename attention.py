"""Attention for million-token sequences: blocks with log-sum-exp, chunked, and ring attention.

At 1M-4M tokens attention is ~98% of the work, and its inputs alone do not fit on one GPU. All of it rests on
one idea: attention can be computed block by block if each block also returns the log-sum-exp (lse) of its
scores. Results over disjoint keys merge exactly,
    lse = log(exp(lse1) + exp(lse2)),   out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse),
and the backward pass of a block only needs the FINAL out and lse of its query rows (FlashAttention's trick):
dS = P * (dP - rowsum(dO * O)), with P = exp(S - lse). Public functions take (batch, seq, heads, head_dim), k/v with
their fewer heads (GQA), viewed head-major inside (a transpose, never a copy), never repeated before communication."""
import math

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

aten = torch.ops.aten

# Keys (and queries) per tile: one fused kernel call up to this length, above it O(T x block) memory, not O(T^2).
# Each tile adds merges and fp32 accumulations that move memory without doing attention, so larger tiles run
# faster: at 128K tokens on an H200 (bf16, Llama 3.1 8B's heads), 4096 / 8192 / 16384 reached 0.83x / 0.92x /
# 0.97x of fused SDPA (bench/README.md).
DEFAULT_BLOCK_SIZE = 16384
MATH_ROWS = 128  # query rows per step of the math path: (B, H, 128, Tk) fp32 scores = 256 MiB at 32 heads x 16K keys

def reference_attention(q, k, v, causal=True, doc_ids=None):
    """Plain softmax attention, every score materialised (for tests). q (B, Tq, H, D), k/v (B, Tk, KV, D),
    doc_ids (B, Tk) or None; causal: the queries are the LAST Tq keys, query i sees key j iff j <= i + Tk - Tq.
    Returns out (B, Tq, H, D) in q's dtype and lse (B, H, Tq) fp32."""
    Tq, H, D, Tk, KV = *q.shape[1:], *k.shape[1:3]
    k, v = (x.repeat_interleave(H // KV, dim=2) for x in (k, v))  # copies: fine for a reference
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (1.0 / math.sqrt(D))  # (B, H, Tq, Tk)
    same_doc = None if doc_ids is None else doc_ids[:, -Tq:, None] == doc_ids[:, None, :]
    visible = _visible_keys(Tq, Tk, causal, same_doc, q.device)  # (B or 1, Tq, Tk)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (B, H, Tq)
    probs = torch.exp(scores - _finite_or_zero(lse)[..., None])  # a row with no key: all zeros
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype), lse

def _visible_keys(Tq, Tk, causal, mask, device):  # (B or 1, Tq, Tk) bool: True = may attend
    visible = torch.ones(1, Tq, Tk, dtype=torch.bool, device=device)
    visible = visible.tril(diagonal=Tk - Tq) if causal else visible
    return visible if mask is None else visible & mask

def _zeros32(x):
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device)

def _heads(*xs):  # (B, T, heads, D) -> head-major (B, heads, T, D) views of the same memory
    return [x.transpose(1, 2) for x in xs]

def _finite_or_zero(lse):  # -inf -> 0, so that exp(-inf - lse) is 0 rather than NaN
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)

def attention_block_forward(q, k, v, scale, causal=False, mask=None):
    """One block, q (B, H, Tq, D) against k/v (B, KV, Tk, D), head-major -> out (B, H, Tq, D) in q's dtype, lse
    (B, H, Tq) fp32; a query row that sees no key gets out 0 and lse -inf. `causal` is only ever used for square
    diagonal blocks (same positions), where PyTorch's top-left and bottom-right aligned causal masks agree. A
    document mask (B, Tq, Tk) bool, or a device other than CPU or CUDA, takes the math path; else fused kernels."""
    if mask is None and q.device.type in ("cpu", "cuda"):
        return _fused_block_forward(q, k, v, scale, causal)
    out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)
    for rows, probs, rows_lse in _math_rows(q, k, scale, causal, mask):
        out[:, :, rows] = (probs @ v.float().unsqueeze(2)).flatten(1, 2)
        lse[:, :, rows] = rows_lse.flatten(1, 2)
    return out, lse

def attention_block_backward(dout, q, k, v, out, lse, scale, causal=False, mask=None):
    """(dq, dk, dv) of a block (as above), dk/dv with KV heads, given the FINAL out and lse of the query rows
    (merged over all key blocks), so that the gradients of separate blocks simply add up, exactly."""
    if mask is None and q.device.type in ("cpu", "cuda"):
        return _fused_block_backward(dout, q, k, v, out, lse, scale, causal)
    dq, dk, dv = q.new_empty(q.shape, dtype=torch.float32), _zeros32(k), _zeros32(v)
    for rows, probs, _ in _math_rows(q, k, scale, causal, mask, lse):
        rows_dout = _grouped(dout, rows, k.shape[1])  # (B, KV, G, rows, D)
        dv += (probs.transpose(-1, -2) @ rows_dout).sum(dim=2)  # (B, KV, Tk, D)
        dprobs = rows_dout @ v.float().unsqueeze(2).transpose(-1, -2)  # (B, KV, G, rows, Tk)
        row_dot = (rows_dout * _grouped(out, rows, k.shape[1])).sum(dim=-1, keepdim=True)
        dscores = probs * (dprobs - row_dot) * scale
        dq[:, :, rows] = (dscores @ k.float().unsqueeze(2)).flatten(1, 2)
        dk += (dscores.transpose(-1, -2) @ _grouped(q, rows, k.shape[1])).sum(2)
    return dq, dk, dv

def _math_rows(q, k, scale, causal, mask, lse=None):
    """Yield (rows, probabilities (B, KV, G, rows, Tk) fp32, lse (B, KV, G, rows)) per MATH_ROWS query rows,
    the G query heads of a KV head grouped; with lse given (backward), against it."""
    visible = _visible_keys(q.shape[2], k.shape[2], causal, mask, q.device)
    for start in range(0, q.shape[2], MATH_ROWS):
        rows = slice(start, start + MATH_ROWS)
        scores = _grouped(q, rows, k.shape[1]) @ k.float().unsqueeze(2).transpose(-1, -2) * scale
        scores = scores.masked_fill(~visible[:, None, None, rows], float("-inf"))
        rows_lse = scores.logsumexp(dim=-1) if lse is None else _grouped(lse, rows, k.shape[1])
        yield rows, torch.exp(scores - _finite_or_zero(rows_lse)[..., None]), rows_lse

def _grouped(x, rows, n_kv_heads):  # x[:, :, rows] (B, H, rows, ...) as (B, KV, G, rows, ...)
    return x[:, :, rows].float().unflatten(1, (n_kv_heads, -1))

# The fused kernels. CPU: PyTorch's flash kernel for CPU, with the KV heads of ONE block repeated (a block-sized
# copy, after any communication) and their gradients summed back: given fewer KV heads it ran 4x slower (4 query
# heads on 1 KV head, torch 2.13). CUDA: the kernel SDPA would pick, KV heads as they are. On Hopper, cuDNN:
# FlashAttention-2, once called here by name, took 1.9x its time on the same H200 tiles, holding chunked attention
# to half of SDPA's TFLOP/s (bench/README.md). Older GPUs: FlashAttention-2; fp32: memory-efficient, KV repeated.
def _repeat_kv_heads(x, n_heads):  # (B, KV, T, D) -> (B, H, T, D): query head h uses KV head h // (H / KV)
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)

def _sum_kv_heads(grad, n_kv_heads):  # (B, H, T, D) -> (B, KV, T, D): the gradient of _repeat_kv_heads
    return grad if grad.shape[1] == n_kv_heads else grad.unflatten(1, (n_kv_heads, -1)).sum(2)

def _cuda_kernel(q, k, v, scale, causal):
    """CUDNN_ATTENTION or FLASH_ATTENTION where F.scaled_dot_product_attention would run it on these inputs
    with the KV heads as they are (it follows sdpa_kernel and deterministic mode); else EFFICIENT_ATTENTION
    (fp32 too), which SDPA only offers with the KV heads repeated."""
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=causal, scale=scale, enable_gqa=True))
    except RuntimeError:  # no SDPA kernel is allowed for these inputs (sdpa_kernel settings)
        return SDPBackend.EFFICIENT_ATTENTION
    fast = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)
    return choice if choice in fast else SDPBackend.EFFICIENT_ATTENTION

def _fused_block_forward(q, k, v, scale, causal):
    B, H, Tq = q.shape[:3]
    kernel = _cuda_kernel(q, k, v, scale, causal) if q.device.type == "cuda" else None  # None: the CPU kernel
    if kernel == SDPBackend.CUDNN_ATTENTION:
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return out, lse.reshape(B, H, Tq)  # cuDNN's lse has a trailing dimension of 1
    if kernel == SDPBackend.FLASH_ATTENTION:
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    k, v = _repeat_kv_heads(k, H), _repeat_kv_heads(v, H)
    if kernel is None:
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[:, :, :Tq]  # the efficient kernel pads lse to a multiple of 32 rows

def _fused_block_backward(dout, q, k, v, out, lse, scale, causal):
    H, Tq, KV, Tk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    kernel = _cuda_kernel(q, k, v, scale, causal) if q.device.type == "cuda" else None  # None: the CPU kernel
    # No dropout: the kernels' random-number state is never read (cuDNN wants it on the GPU).
    no_rng = torch.empty((), dtype=torch.long, device=q.device if kernel == SDPBackend.CUDNN_ATTENTION else None)
    if kernel == SDPBackend.CUDNN_ATTENTION:
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), no_rng, no_rng, None, None, None, Tq, Tk, 0.0, causal, scale=scale)
    if kernel == SDPBackend.FLASH_ATTENTION:
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, Tq, Tk, 0.0, causal, no_rng, no_rng, scale=scale)
    k, v = _repeat_kv_heads(k, H), _repeat_kv_heads(v, H)
    if kernel is None:
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    else:
        lse = torch.nn.functional.pad(lse, (0, -Tq % 32))
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _sum_kv_heads(dk, KV), _sum_kv_heads(dv, KV)

def merge_partial_attention(out, lse, block_out, block_lse):
    """Merge a block's result into out (B, H, T, D) and lse (B, H, T), fp32, IN PLACE, over disjoint keys. A
    row that has seen no key has lse = -inf and out = 0; -inf on either side (or both) never makes a NaN:
    -inf minus -inf is exactly the bug public ring-attention code hit."""
    merged_lse = torch.logaddexp(lse, block_lse)  # logaddexp(-inf, -inf) = -inf, no NaN
    reference = _finite_or_zero(merged_lse)  # exp(-inf - reference) = 0: an empty side weighs nothing
    out.mul_(torch.exp(lse - reference)[..., None]).addcmul_(block_out, torch.exp(block_lse - reference)[..., None])
    lse.copy_(merged_lse)

def _attention_tiles(rows, cols, causal, block_size, q_doc=None, k_doc=None):
    """Yield (query rows, key columns, is_diagonal, mask (B, rows, cols) bool or None) for the tiles of queries
    `rows` against keys `cols` (ranges) with a visible key, q_doc (B, Tq) and k_doc (B, Tk) the document ids or
    None. Causal: the queries are the last keys; a query block's own positions form one square diagonal tile."""
    offset = cols.stop - rows.stop  # query i is key i + offset
    for q_start in range(rows.start, rows.stop, block_size):
        q_rows = slice(q_start, min(q_start + block_size, rows.stop))
        seen_by_all = q_start + offset if causal else cols.stop  # keys all these queries see
        tiles = [(slice(start, min(start + block_size, seen_by_all)), False)
                 for start in range(cols.start, seen_by_all, block_size)]
        if causal:
            tiles.append((slice(q_rows.start + offset, q_rows.stop + offset), True))
        for k_cols, is_diagonal in tiles:
            mask = None if q_doc is None else q_doc[:, q_rows, None] == k_doc[:, None, k_cols]
            if mask is not None:
                if not mask.any():
                    continue  # a query block and a key block of two different documents
                if bool((mask | torch.ones_like(mask[0]).triu(1) if is_diagonal else mask).all()):
                    mask = None  # the documents hide nothing here (causality hides above)
            yield q_rows, k_cols, is_diagonal, mask

def chunked_attention(q, k, v, causal=True, doc_ids=None, *, block_size=DEFAULT_BLOCK_SIZE):
    """Exact softmax attention on one device, in block_size x block_size tiles, fp32 accumulated: q (B, Tq, H, D),
    k, v (B, Tk, KV, D) -> (B, Tq, H, D) in q's dtype. causal with Tk > Tq: the queries are the last Tq keys
    (KV-cache prefill, decode). doc_ids (B, Tk) or None: a query sees only its own document. Skips tiles above
    the diagonal or between documents; O(T x block) memory in both passes; deterministic (checkpointing-safe)."""
    _check_attention_inputs(q, k, v, doc_ids, block_size)
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(f"causal attention needs at least as many keys as queries ({k.shape[1]} < {q.shape[1]}).")
    return _RingAttention.apply(q, k, v, doc_ids, None, 0, 1, causal, block_size)

def _check_attention_inputs(q, k, v, doc_ids, block_size):
    if q.dim() != 4 or k.shape != v.shape or (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]):
        raise ValueError(f"q (B, Tq, H, D) and k, v of the same shape (B, Tk, KV, D) are needed, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}.")
    if k.shape[2] > q.shape[2] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"the number of query heads ({q.shape[2]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[2]}).")
    if doc_ids is not None and doc_ids.shape != k.shape[:2]:
        raise ValueError(f"doc_ids must be shaped {tuple(k.shape[:2])} (batch, keys), got {tuple(doc_ids.shape)}.")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")

# Ring attention: P ranks each hold 2 of the 2P chunks of the sequence (the zigzag layout, below) and keep their
# queries; the K/V blocks travel around the ring, one hop per step, the next one's transfer running while the
# current one is computed: after P steps every query has met every key, and no rank holds more than two K/V
# blocks at once. Rank r holds chunks (r, 2P-1-r); at step s, the block of rank src = (r - s) mod P, seen thus:
#   src == r: its own chunks, causal within them (chunk 2P-1-r sees all of chunk r);
#   src <  r: both query chunks come after KV chunk src and before KV chunk 2P-1-src: all see the block's first half;
#   src >  r: only query chunk 2P-1-r comes after the block's chunks, and it sees all of it.
# Every step costs each rank the same (half a block of full attention), hence the balance.
class RingExchange:
    """start([k, v, doc_ids]) sends to the next rank (None entries are not sent); wait() returns the previous
    rank's list. Sends are posted before receives in one batch_isend_irecv (no deadlock in gloo or NCCL, 2 ranks
    or more); each exchange has its own tag (gloo matches by tag): K/V and dK/dV in flight are never confused."""
    def __init__(self, group, rank, world_size, tag):
        self.group, self.world_size, self.tag = group, world_size, tag
        self.next, self.previous = (rank + 1) % world_size, (rank - 1) % world_size

    def start(self, tensors):
        self.sending = [None if t is None else t.contiguous() for t in tensors]  # kept alive
        if self.world_size == 1:  # a ring of one (chunked attention): hand them straight back
            self.receiving, self.requests = self.sending, []
            return
        self.receiving = [None if t is None else torch.empty_like(t) for t in self.sending]
        operations = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self.next, tag=self.tag)
                      for t in self.sending if t is not None]
        operations += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.previous, tag=self.tag)
                       for t in self.receiving if t is not None]
        self.requests = dist.batch_isend_irecv(operations)

    def wait(self):
        for request in self.requests:
            request.wait()
        received = self.receiving
        self.sending = self.receiving = self.requests = None  # frees the sent block at once
        return received

def _ring_steps(settings, k, v, doc_ids, n_queries):
    """Yield (k, v) head-major and the tiles (as _attention_tiles) this rank's queries see in them, for the K/V
    block held at each of the P steps; the next block's transfer runs meanwhile. k, v (B, Tk, KV, D)."""
    group, rank, world_size, causal, _, block_size = settings
    q_doc = None if doc_ids is None else doc_ids[:, -n_queries:]  # the queries are the last keys
    block, n_keys, exchange = [k, v, doc_ids], k.shape[1], RingExchange(group, rank, world_size, tag=0)
    for step in range(world_size):
        if step + 1 < world_size:
            exchange.start(block)
        source = (rank - step) % world_size  # whose block this is: the three cases above
        rows, cols, step_causal = range(n_queries), range(n_keys), causal
        if causal and source < rank:
            cols, step_causal = range(n_keys // 2), False
        elif causal and source > rank:
            rows, step_causal = range(n_queries // 2, n_queries), False
        yield *_heads(*block[:2]), _attention_tiles(rows, cols, step_causal, block_size, q_doc, block[2])
        if step + 1 < world_size:
            block = exchange.wait()

class _RingAttention(torch.autograd.Function):
    """Forward: K/V blocks go around the ring once. Backward: again, each with the fp32 accumulator of its dK/dV
    one hop behind, which lands on the block's owner complete after the last step. Saves only q, k, v, out,
    lse (backward recomputes tiles); chunked_attention is a ring of one."""
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, group, rank, world_size, causal, block_size):
        B, Tq, H, D = q.shape
        scale = 1.0 / math.sqrt(D)
        ctx.settings = group, rank, world_size, causal, scale, block_size
        out = _zeros32(q)  # (B, Tq, H, D), and lse (B, H, Tq): no key seen yet
        lse = torch.full((B, H, Tq), float("-inf"), dtype=torch.float32, device=q.device)
        q_heads, out_heads = _heads(q, out)
        for k_heads, v_heads, tiles in _ring_steps(ctx.settings, k, v, doc_ids, Tq):
            for rows, cols, is_diagonal, mask in tiles:
                merge_partial_attention(out_heads[:, :, rows], lse[:, :, rows], *attention_block_forward(
                    q_heads[:, :, rows], k_heads[:, :, cols], v_heads[:, :, cols], scale, is_diagonal, mask))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        group, rank, world_size, _, scale, _ = ctx.settings
        dq = _zeros32(q)
        dout_heads, q_heads, out_heads, dq_heads = _heads(dout.to(q.dtype), q, out, dq)
        grad_exchange = RingExchange(group, rank, world_size, tag=1)  # in flight with the K/V exchange
        for step, (k_heads, v_heads, tiles) in enumerate(_ring_steps(ctx.settings, k, v, doc_ids, q.shape[1])):
            # The dK/dV accumulator of the block we hold: new at step 0 (our own), else from its last holder.
            # Waiting before computing exposes O(T) (not O(T^2)), saves a buffer.
            block_dk, block_dv = (_zeros32(k), _zeros32(v)) if step == 0 else grad_exchange.wait()
            dk_heads, dv_heads = _heads(block_dk, block_dv)
            for rows, cols, is_diagonal, mask in tiles:
                tile_dq, tile_dk, tile_dv = attention_block_backward(
                    dout_heads[:, :, rows], q_heads[:, :, rows], k_heads[:, :, cols], v_heads[:, :, cols],
                    out_heads[:, :, rows], lse[:, :, rows].contiguous(), scale, is_diagonal, mask)
                dq_heads[:, :, rows] += tile_dq
                dk_heads[:, :, cols] += tile_dk
                dv_heads[:, :, cols] += tile_dv
            grad_exchange.start([block_dk, block_dv])
        dk, dv = grad_exchange.wait()  # our own block's accumulator, back with every rank's share
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 6

def ring_attention(q, k, v, group, causal=True, doc_ids=None, *, block_size=DEFAULT_BLOCK_SIZE):
    """Exact attention over a sequence split across the P ranks of `group` (None: the default group), gloo or
    NCCL. q (B, T, H, D), k/v (B, T, KV, D), doc_ids (B, T): THIS rank's zigzag shard (its positions are
    zigzag_indices(P x T, rank, P)) -> its rows of the output (B, T, H, D), q's dtype, exact gradients."""
    _check_attention_inputs(q, k, v, doc_ids, block_size)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring attention needs torch.distributed to be initialised first.")
    world_size = dist.get_world_size(group)
    if not 0 < world_size <= dist.get_world_size():
        raise ValueError(f"the process group has {world_size} ranks but the world has only "
                         f"{dist.get_world_size()} processes (-1: this process is not in it).")
    if q.shape[1] != k.shape[1] or q.shape[1] % 2 != 0:
        raise ValueError(f"a zigzag shard of q, k and v holds two equal chunks, got lengths {q.shape[1]} and "
                         f"{k.shape[1]}: the sequence length must be divisible by 2 x cp = {2 * world_size}.")
    return _RingAttention.apply(q, k, v, doc_ids, group, dist.get_rank(group), world_size, causal, block_size)

# Causal attention is triangular: P consecutive pieces would give the last rank P times the work of the first.
# 2P chunks, rank r holding chunks r and 2P-1-r, pair a cheap chunk with an expensive one: every rank does the
# same work. Tokens, labels, positions and loss mask are split by this one permutation; RoPE uses a rank's positions:
#     positions = zigzag_indices(seq_len, cp_rank, cp)  # [0, 1, 6, 7] on rank 0 of 2
def zigzag_ranges(seq_len, rank, world_size):
    """Global positions `rank` holds, as two [start, stop) ranges: the layout's one definition (data.Loader's too)."""
    n_chunks = 2 * world_size
    if seq_len % n_chunks != 0:
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 x cp = {n_chunks} (zigzag sharding).")
    chunk = seq_len // n_chunks
    return [(i * chunk, (i + 1) * chunk) for i in (rank, n_chunks - 1 - rank)]

def zigzag_indices(seq_len, rank, world_size):  # zigzag_ranges as one tensor of positions, in order
    return torch.cat([torch.arange(*r) for r in zigzag_ranges(seq_len, rank, world_size)])
