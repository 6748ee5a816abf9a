"""Attention for million-token sequences: blocks with log-sum-exp, chunked, and ring attention.

At 1M-4M tokens attention is ~98% of the work and its inputs are the only thing that does not
fit on one GPU. Everything here is built from one idea: softmax attention over a set of keys
can be computed block by block, if each block also returns the log-sum-exp (lse) of its scores.
Two partial results over disjoint key sets merge exactly:

    lse = log(exp(lse1) + exp(lse2)),   out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)

and the backward pass of a block only needs the FINAL out and lse of its query rows
(FlashAttention's trick): dS = P * (dP - rowsum(dO * O)), with P = exp(S - lse).

Read top to bottom:
  1. reference_attention         the short pure-PyTorch definition the tests compare against
  2. attention_block_forward/backward   one (query block, key block) pair: fused kernel or math
  3. merge_partial_attention     the numerically stable merge
  4. chunked_attention           one device: tiles of block_size x block_size, causal tiles skipped
  5. ring_attention              context parallel: KV blocks travel around a ring of ranks
  6. zigzag_shard / zigzag_unshard   the load-balanced sequence split that ring attention expects

Public functions take (batch, seq, heads, head_dim) tensors, with k/v keeping their fewer heads
(GQA: 8 KV heads for 32 query heads in Llama 3.1 8B). Inside, the same memory is viewed
head-major, (batch, heads, seq, head_dim), which is what the fused kernels take; that is a
transpose of strides, never a copy. KV heads are never repeated before communication.
"""

import math

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

aten = torch.ops.aten

# Keys (and queries) per tile. One tile for anything up to this length, so short sequences cost
# one fused kernel call; above it, memory is O(T x block) instead of O(T^2). Every tile adds
# merges and fp32 accumulations that move memory without doing attention, and a larger tile
# spreads them over more work: at 128K tokens on an H200 (bf16, Llama 3.1 8B's heads), blocks of
# 4096 / 8192 / 16384 reached 0.83x / 0.92x / 0.97x of fused SDPA's TFLOP/s (bench/README.md).
DEFAULT_BLOCK_SIZE = 16384


# ---------------------------------------------------------------------------------------------
# 1. The definition
# ---------------------------------------------------------------------------------------------

def reference_attention(q, k, v, causal=True, doc_ids=None, scale=None):
    """Plain softmax attention, materialising every score. For tests and tiny inputs only.

    q (B, Tq, H, D), k/v (B, Tk, KV, D), doc_ids (B, Tk) or None.
    Causal means the queries are the LAST Tq positions of the keys (bottom-right aligned):
    query i sees key j iff j <= i + (Tk - Tq). Returns out (B, Tq, H, D) in q's dtype and
    lse (B, H, Tq) in fp32 (-inf for a query that sees no key).
    """
    B, Tq, H, D = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // KV, dim=2)  # a copy per query head: fine for a reference
    v = v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # (B, H, Tq, Tk)
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(diagonal=Tk - Tq)
    visible = visible.expand(B, 1, Tq, Tk)
    if doc_ids is not None:
        same_doc = doc_ids[:, -Tq:, None] == doc_ids[:, None, :]  # (B, Tq, Tk)
        visible = visible & same_doc[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (B, H, Tq)
    probs = torch.exp(scores - _finite_or_zero(lse)[..., None])  # a row with no key: all zeros
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(q.dtype), lse


def _finite_or_zero(lse):
    """lse with -inf replaced by 0, so that exp(-inf - lse) is 0 rather than NaN."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


# ---------------------------------------------------------------------------------------------
# 2. One block: queries (B, H, Tq, D) against keys/values (B, KV, Tk, D), head-major
# ---------------------------------------------------------------------------------------------
# `causal` here is only ever used for square diagonal blocks (Tq == Tk, same positions), where
# the top-left aligned mask of PyTorch's kernels and the bottom-right one agree.
# `mask` is an optional (B, Tq, Tk) bool tensor (the document mask): True = may attend.
# Every function guarantees: a query row that sees no key gets out = 0 and lse = -inf.

def attention_block_forward(q, k, v, scale, causal=False, mask=None):
    """(out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32) for one block pair.

    Uses PyTorch's fused kernel for the device (CPU or CUDA); masked blocks and other devices
    use the math path, which is exact and handles rows that see no key.
    """
    if mask is None and q.device.type in ("cpu", "cuda"):
        return _fused_block_forward(q, k, v, scale, causal)
    return _math_block_forward(q, k, v, scale, _visible_keys(q, k, causal, mask))


def attention_block_backward(dout, q, k, v, out, lse, scale, causal=False, mask=None):
    """(dq, dk, dv) of one block pair, given the FINAL out and lse of its query rows.

    Because out and lse are the merged results over all key blocks, the gradients of separate
    blocks simply add up: this is what makes chunked and ring backward passes exact.
    dk/dv come back with KV heads.
    """
    if mask is None and q.device.type in ("cpu", "cuda"):
        return _fused_block_backward(dout, q, k, v, out, lse, scale, causal)
    return _math_block_backward(dout, q, k, v, out, lse, scale,
                                _visible_keys(q, k, causal, mask))


# The math path materialises its scores, so it runs MATH_ROWS query rows at a time: at most
# (B, H, MATH_ROWS, Tk) fp32 scores at once (256 MiB for 32 heads and 16384 keys).
MATH_ROWS = 128


def _visible_keys(q, k, causal, mask):
    """(B or 1, Tq, Tk) bool: which keys each query may attend to in this block."""
    Tq, Tk = q.shape[2], k.shape[2]
    visible = torch.ones(1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(diagonal=Tk - Tq)
    return visible if mask is None else visible & mask


def _math_scores(q, k, scale, visible):
    """Masked scores (B, KV, G, Tq, Tk) in fp32, grouping the G query heads of each KV head
    instead of repeating the KV heads."""
    KV = k.shape[1]
    q_grouped = q.float().unflatten(1, (KV, -1))  # (B, KV, G, Tq, D)
    scores = q_grouped @ k.float().unsqueeze(2).transpose(-1, -2) * scale
    return scores.masked_fill(~visible[:, None, None], float("-inf"))


def _math_block_forward(q, k, v, scale, visible):
    B, H, Tq, D = q.shape
    out = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    for start in range(0, Tq, MATH_ROWS):
        rows = slice(start, start + MATH_ROWS)
        scores = _math_scores(q[:, :, rows], k, scale, visible[:, rows])
        rows_lse = scores.logsumexp(dim=-1)  # (B, KV, G, rows), -inf where a row sees nothing
        probs = torch.exp(scores - _finite_or_zero(rows_lse)[..., None])
        out[:, :, rows] = (probs @ v.float().unsqueeze(2)).flatten(1, 2)
        lse[:, :, rows] = rows_lse.flatten(1, 2)
    return out, lse


def _math_block_backward(dout, q, k, v, out, lse, scale, visible):
    KV = k.shape[1]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for start in range(0, q.shape[2], MATH_ROWS):
        rows = slice(start, start + MATH_ROWS)
        scores = _math_scores(q[:, :, rows], k, scale, visible[:, rows])
        rows_lse = _finite_or_zero(lse[:, :, rows].float().unflatten(1, (KV, -1)))
        probs = torch.exp(scores - rows_lse[..., None])  # softmax over the FULL row's keys
        rows_dout = dout[:, :, rows].float().unflatten(1, (KV, -1))  # (B, KV, G, rows, D)
        rows_out = out[:, :, rows].float().unflatten(1, (KV, -1))
        dv += (probs.transpose(-1, -2) @ rows_dout).sum(dim=2)  # (B, KV, Tk, D)
        dprobs = rows_dout @ v.float().unsqueeze(2).transpose(-1, -2)  # (B, KV, G, rows, Tk)
        row_dot = (rows_dout * rows_out).sum(dim=-1, keepdim=True)  # (B, KV, G, rows, 1)
        dscores = probs * (dprobs - row_dot) * scale
        dq[:, :, rows] = (dscores @ k.float().unsqueeze(2)).flatten(1, 2)
        dk += (dscores.transpose(-1, -2) @ q[:, :, rows].float().unflatten(1, (KV, -1))).sum(2)
    return dq, dk, dv


# The fused kernels. All of them return the lse and have a backward that takes the final out and
# lse. CPU: PyTorch's flash-attention kernel for CPU, called with equal head counts: the KV heads
# of ONE block are repeated locally (a block-sized copy, made after any communication) and the
# repeated gradients summed back; the CPU kernel accepts fewer KV heads, but ran 4x slower that
# way here (4 query heads on 1 KV head, torch 2.13). CUDA: whichever kernel
# F.scaled_dot_product_attention itself would run on these inputs. On Hopper that is cuDNN's
# attention: the FlashAttention-2 kernel this file used to call by name took 1.9x its time on the
# same tiles of an H200 and held chunked attention to half of SDPA's TFLOP/s (bench/README.md).
# On older GPUs it is FlashAttention-2; for fp32 the memory-efficient kernel. cuDNN and
# FlashAttention-2 take the KV heads as they are (GQA), the memory-efficient kernel repeated.

def _repeat_kv_heads(x, n_heads):
    """(B, KV, T, D) -> (B, H, T, D), query head h using KV head h // (H / KV), as in Llama."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def _sum_kv_heads(grad, n_kv_heads):
    """(B, H, T, D) -> (B, KV, T, D): the gradient of _repeat_kv_heads."""
    return grad if grad.shape[1] == n_kv_heads else grad.unflatten(1, (n_kv_heads, -1)).sum(2)


def _cuda_kernel(q, k, v, scale, causal):
    """CUDNN_ATTENTION or FLASH_ATTENTION where F.scaled_dot_product_attention would run that
    kernel on these inputs, KV heads as they are (it follows torch.nn.attention.sdpa_kernel and
    torch.use_deterministic_algorithms too); else EFFICIENT_ATTENTION, fp32 included, which
    SDPA does not offer for fewer KV heads and so gets them repeated."""
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=causal, scale=scale,
                                                    enable_gqa=True))
    except RuntimeError:  # no SDPA kernel is allowed for these inputs (sdpa_kernel settings)
        choice = SDPBackend.ERROR
    if choice in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        return choice
    return SDPBackend.EFFICIENT_ATTENTION


def _fused_block_forward(q, k, v, scale, causal):
    B, H, Tq = q.shape[:3]
    if q.device.type == "cpu":
        k, v = _repeat_kv_heads(k, H), _repeat_kv_heads(v, H)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    kernel = _cuda_kernel(q, k, v, scale, causal)
    if kernel == SDPBackend.CUDNN_ATTENTION:
        out, lse = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return out, lse.reshape(B, H, Tq)  # cuDNN's lse has a trailing dimension of 1
    if kernel == SDPBackend.FLASH_ATTENTION:
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                        scale=scale)[:2]
    k, v = _repeat_kv_heads(k, H), _repeat_kv_heads(v, H)
    out, lse = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[:, :, :Tq]  # the efficient kernel pads lse to a multiple of 32 rows


def _fused_block_backward(dout, q, k, v, out, lse, scale, causal):
    H, Tq, KV, Tk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if q.device.type == "cpu":
        k, v = _repeat_kv_heads(k, H), _repeat_kv_heads(v, H)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        return dq, _sum_kv_heads(dk, KV), _sum_kv_heads(dv, KV)
    # No dropout, so the random-number state the kernels take is never read (cuDNN still wants
    # it on the GPU).
    no_rng = torch.empty((), dtype=torch.long)
    kernel = _cuda_kernel(q, k, v, scale, causal)
    if kernel == SDPBackend.CUDNN_ATTENTION:
        no_rng = torch.empty((), dtype=torch.long, device=q.device)
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), no_rng, no_rng, None, None, None, Tq, Tk,
            0.0, causal, scale=scale)
    if kernel == SDPBackend.FLASH_ATTENTION:
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, Tq, Tk, 0.0, causal, no_rng, no_rng,
            scale=scale)
    k, v = _repeat_kv_heads(k, H), _repeat_kv_heads(v, H)
    lse = torch.nn.functional.pad(lse, (0, -Tq % 32))
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, no_rng, no_rng, 0.0, [True, True, True, False],
        causal, scale=scale)
    return dq, _sum_kv_heads(dk, KV), _sum_kv_heads(dv, KV)


# ---------------------------------------------------------------------------------------------
# 3. The merge
# ---------------------------------------------------------------------------------------------

def merge_partial_attention(out, lse, block_out, block_lse):
    """Merge one block's result into the running result, IN PLACE.

    out (B, H, T, D) fp32 and lse (B, H, T) fp32 hold attention over the keys seen so far;
    block_out/block_lse the same over another, disjoint set of keys. A row that has seen no key
    has lse = -inf and out = 0. Written so that -inf on either side (or both) never produces a
    NaN: subtracting -inf from -inf is exactly the bug public ring-attention code hit.
    """
    merged_lse = torch.logaddexp(lse, block_lse)  # logaddexp(-inf, -inf) = -inf, no NaN
    reference = _finite_or_zero(merged_lse)
    old_weight = torch.exp(lse - reference).unsqueeze(-1)  # exp(-inf) = 0 for an empty side
    new_weight = torch.exp(block_lse - reference).unsqueeze(-1)
    out.mul_(old_weight).addcmul_(block_out, new_weight)
    lse.copy_(merged_lse)


# ---------------------------------------------------------------------------------------------
# 4. Chunked attention on one device
# ---------------------------------------------------------------------------------------------

def _attention_tiles(n_queries, n_keys, causal, block_size):
    """Yield (query rows, key columns, is_diagonal) for every tile that has a visible key.

    With causal=True the queries are the last n_queries key positions, so query row i sits at
    key position i + offset. Key columns are cut so that each query block's own positions form
    one square diagonal tile; the keys before it are fully visible; tiles after it are skipped.
    """
    offset = n_keys - n_queries
    for q_start in range(0, n_queries, block_size):
        q_end = min(q_start + block_size, n_queries)
        rows = slice(q_start, q_end)
        if not causal:
            for k_start in range(0, n_keys, block_size):
                yield rows, slice(k_start, min(k_start + block_size, n_keys)), False
            continue
        diagonal_start = q_start + offset
        for k_start in range(0, diagonal_start, block_size):
            yield rows, slice(k_start, min(k_start + block_size, diagonal_start)), False
        yield rows, slice(diagonal_start, q_end + offset), True


def _tile_document_mask(q_doc, k_doc, is_diagonal):
    """The document mask of one tile: None if it hides nothing, else (B, Tq, Tk) bool.

    q_doc (B, Tq), k_doc (B, Tk) document ids, or None when there is no document mask.
    """
    if q_doc is None:
        return None
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]
    if is_diagonal:
        causal_hidden = ~torch.ones_like(same_doc[0]).tril()
        hides_nothing = bool((same_doc | causal_hidden).all())
    else:
        hides_nothing = bool(same_doc.all())
    return None if hides_nothing else same_doc


def _visible_tiles(n_queries, n_keys, causal, q_doc, k_doc, block_size):
    """_attention_tiles with each tile's document mask, without the tiles it hides entirely
    (a query block and a key block from different documents)."""
    for rows, cols, is_diagonal in _attention_tiles(n_queries, n_keys, causal, block_size):
        if q_doc is None:
            yield rows, cols, is_diagonal, None
            continue
        mask = _tile_document_mask(q_doc[:, rows], k_doc[:, cols], is_diagonal)
        if mask is None or mask.any():
            yield rows, cols, is_diagonal, mask


def _tiles_forward(q, k, v, out, lse, causal, q_doc, k_doc, scale, block_size):
    """Attend q (B, H, Tq, D) to k/v (B, KV, Tk, D) tile by tile, merging into out (B, H, Tq, D)
    and lse (B, H, Tq), both fp32, in place."""
    for rows, cols, is_diagonal, mask in _visible_tiles(
            q.shape[2], k.shape[2], causal, q_doc, k_doc, block_size):
        block_out, block_lse = attention_block_forward(
            q[:, :, rows], k[:, :, cols], v[:, :, cols], scale, is_diagonal, mask)
        merge_partial_attention(out[:, :, rows], lse[:, :, rows], block_out, block_lse)


def _tiles_backward(dout, q, k, v, out, lse, dq, dk, dv, causal, q_doc, k_doc, scale,
                    block_size):
    """The gradients of _tiles_forward, added into the fp32 accumulators dq, dk, dv."""
    for rows, cols, is_diagonal, mask in _visible_tiles(
            q.shape[2], k.shape[2], causal, q_doc, k_doc, block_size):
        block_dq, block_dk, block_dv = attention_block_backward(
            dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
            out[:, :, rows], lse[:, :, rows].contiguous(), scale, is_diagonal, mask)
        dq[:, :, rows] += block_dq
        dk[:, :, cols] += block_dk
        dv[:, :, cols] += block_dv


def _head_major(x):
    """(B, T, H, D) -> a (B, H, T, D) view of the same memory."""
    return x.transpose(1, 2)


class _ChunkedAttention(torch.autograd.Function):
    """Saves only q, k, v, out and lse: the backward recomputes each tile, so memory stays
    O(T x block) in both passes."""

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, causal, scale, block_size):
        B, Tq, H, D = q.shape
        out = torch.zeros(B, Tq, H, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, Tq), float("-inf"), dtype=torch.float32, device=q.device)
        q_doc = None if doc_ids is None else doc_ids[:, -Tq:]
        _tiles_forward(_head_major(q), _head_major(k), _head_major(v), _head_major(out), lse,
                       causal, q_doc, doc_ids, scale, block_size)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.causal, ctx.scale, ctx.block_size = causal, scale, block_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        q_doc = None if doc_ids is None else doc_ids[:, -q.shape[1]:]
        _tiles_backward(_head_major(dout.to(q.dtype)), _head_major(q), _head_major(k),
                        _head_major(v), _head_major(out), lse, _head_major(dq),
                        _head_major(dk), _head_major(dv), ctx.causal, q_doc, doc_ids,
                        ctx.scale, ctx.block_size)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _check_attention_inputs(q, k, v, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be 4-D tensors shaped (batch, seq, heads, head_dim).")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch size "
                         f"and head_dim.")
    n_heads, n_kv_heads = q.shape[2], k.shape[2]
    if n_kv_heads > n_heads or n_heads % n_kv_heads != 0:
        raise ValueError(f"the number of query heads ({n_heads}) must be a multiple of the "
                         f"number of key/value heads ({n_kv_heads}).")
    if doc_ids is not None and tuple(doc_ids.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"doc_ids must be shaped (batch, key seq) = {(k.shape[0], k.shape[1])}"
                         f", got {tuple(doc_ids.shape)}.")


def chunked_attention(q, k, v, causal=True, doc_ids=None, *, scale=None,
                      block_size=DEFAULT_BLOCK_SIZE):
    """Exact softmax attention on one device, in tiles of block_size queries x block_size keys.

    q (B, Tq, H, D); k, v (B, Tk, KV, D) with H a multiple of KV. Returns (B, Tq, H, D) in q's
    dtype, accumulated in fp32. causal=True with Tk > Tq means the queries are the last Tq key
    positions (KV-cache prefill and Tq=1 decode): query i sees keys j <= i + Tk - Tq.
    doc_ids (B, Tk) integer document ids, or None: when given, a query only sees keys of its own
    document (the queries' ids are the last Tq of them). Tiles above the causal diagonal or
    between different documents are skipped; peak memory is O(T x block_size) in forward and
    backward. Differentiable; the forward is deterministic (safe under activation
    checkpointing).
    """
    _check_attention_inputs(q, k, v, doc_ids)
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(f"causal attention needs at least as many keys as queries "
                         f"(got {k.shape[1]} keys for {q.shape[1]} queries).")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _ChunkedAttention.apply(q, k, v, doc_ids, causal, scale, block_size)


# ---------------------------------------------------------------------------------------------
# 5. Ring attention (context parallelism)
# ---------------------------------------------------------------------------------------------
# P ranks each hold 2 of the 2P chunks of the sequence (zigzag, section 6). Each rank keeps its
# queries; the key/value blocks travel around the ring, one hop per step, so after P steps every
# query has met every key and no rank ever holds more than two KV blocks at once (its current
# one and the one arriving). The next block's transfer runs while the current one is computed.
#
# Which part of a block a rank's queries see follows from the zigzag layout. Rank r holds
# chunks (r, 2P-1-r); at step s it holds the KV block of rank src = (r - s) mod P:
#   src == r: its own chunks, causal within them (chunk 2P-1-r sees all of chunk r);
#   src <  r: both query chunks come after KV chunk src and before KV chunk 2P-1-src,
#             so all queries see the first half of the block;
#   src >  r: only query chunk 2P-1-r comes after the block's chunks, and it sees all of it.
# Every step costs each rank the same (half a block of full attention), hence the balance.

def _ring_step_tiles(rank, source, local_len, causal):
    """(query rows, KV rows, causal) that this rank computes against the block of `source`."""
    everything, half = slice(0, local_len), local_len // 2
    if not causal:
        return everything, everything, False
    if source == rank:
        return everything, everything, True
    if source < rank:
        return everything, slice(0, half), False
    return slice(half, local_len), everything, False


class RingExchange:
    """Owns the transfer of one set of tensors to the next rank of the ring and the reception
    of the previous rank's set, asynchronously.

        exchange.start([k, v, doc_ids])   # post the sends and the receives
        ... compute on the current block ...
        k, v, doc_ids = exchange.wait()   # the previous rank's tensors

    None entries (no document ids) are not sent and come back as None. Every rank posts its
    sends before its receives in one batch_isend_irecv, the same on all ranks, so neither gloo
    nor NCCL can deadlock, with 2 ranks (next == previous) or more. Each exchange uses its own
    tag so that two exchanges in flight at once (keys/values and, in the backward pass, their
    gradients) cannot be confused by gloo, which matches messages by tag. A ring of one rank
    sends to itself: start/wait then just hand the tensors back.
    """

    def __init__(self, group, rank, world_size, tag):
        self.group, self.rank, self.world_size, self.tag = group, rank, world_size, tag
        self._sending, self._receiving, self._requests = None, None, None

    def start(self, tensors):
        self._sending = [None if t is None else t.contiguous() for t in tensors]  # kept alive
        if self.world_size == 1:
            self._receiving, self._requests = self._sending, []
            return
        self._receiving = [None if t is None else torch.empty_like(t) for t in self._sending]
        next_rank = (self.rank + 1) % self.world_size
        previous_rank = (self.rank - 1) % self.world_size
        operations = [dist.P2POp(dist.isend, t, group=self.group, group_peer=next_rank,
                                 tag=self.tag) for t in self._sending if t is not None]
        operations += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=previous_rank,
                                  tag=self.tag) for t in self._receiving if t is not None]
        self._requests = dist.batch_isend_irecv(operations)

    def wait(self):
        for request in self._requests:
            request.wait()
        received = self._receiving
        self._sending, self._receiving, self._requests = None, None, None
        return received


# gloo message tags of the two exchanges that can be in flight at once
_KV_TAG, _KV_GRAD_TAG = 0, 1


class _RingAttention(torch.autograd.Function):
    """Forward: KV blocks go around the ring once. Backward: they go around again, and with each
    block travels the fp32 accumulator of its dK/dV, one hop behind; after the last step the
    accumulator has visited every rank and lands on the block's owner, complete."""

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, group, rank, world_size, causal, scale, block_size):
        B, T, H, D = q.shape
        out = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
        q_heads, out_heads = _head_major(q), _head_major(out)
        block = _travelling_block(k, v, doc_ids)
        exchange = RingExchange(group, rank, world_size, _KV_TAG)
        for step in range(world_size):
            if step + 1 < world_size:
                exchange.start(block)
            block_k, block_v, block_doc = block
            rows, kv_rows, tile_causal = _ring_step_tiles(
                rank, (rank - step) % world_size, T, causal)
            _tiles_forward(q_heads[:, :, rows], _head_major(block_k[:, kv_rows]),
                           _head_major(block_v[:, kv_rows]), out_heads[:, :, rows],
                           lse[:, :, rows], tile_causal,
                           None if doc_ids is None else doc_ids[:, rows],
                           None if doc_ids is None else block_doc[:, kv_rows],
                           scale, block_size)
            if step + 1 < world_size:
                block = exchange.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.group, ctx.rank, ctx.world_size = group, rank, world_size
        ctx.causal, ctx.scale, ctx.block_size = causal, scale, block_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        rank, world_size, T = ctx.rank, ctx.world_size, q.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        q_heads, out_heads, dq_heads = _head_major(q), _head_major(out), _head_major(dq)
        dout_heads = _head_major(dout.to(q.dtype))
        block = _travelling_block(k, v, doc_ids)
        kv_exchange = RingExchange(ctx.group, rank, world_size, _KV_TAG)
        grad_exchange = RingExchange(ctx.group, rank, world_size, _KV_GRAD_TAG)
        for step in range(world_size):
            if step + 1 < world_size:
                kv_exchange.start(block)
            block_k, block_v, block_doc = block
            if step == 0:  # our own block: we are the first to add to its gradient
                block_dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
                block_dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            else:
                # The accumulator of the block we now hold, from the rank that held it last
                # step. Waiting for it before computing exposes one O(T) transfer per step
                # (against O(T^2) of compute) and saves a third fp32 buffer per rank.
                block_dk, block_dv = grad_exchange.wait()
            rows, kv_rows, tile_causal = _ring_step_tiles(
                rank, (rank - step) % world_size, T, ctx.causal)
            _tiles_backward(dout_heads[:, :, rows], q_heads[:, :, rows],
                            _head_major(block_k[:, kv_rows]), _head_major(block_v[:, kv_rows]),
                            out_heads[:, :, rows], lse[:, :, rows], dq_heads[:, :, rows],
                            _head_major(block_dk[:, kv_rows]), _head_major(block_dv[:, kv_rows]),
                            tile_causal,
                            None if doc_ids is None else doc_ids[:, rows],
                            None if doc_ids is None else block_doc[:, kv_rows],
                            ctx.scale, ctx.block_size)
            if step + 1 < world_size:
                block = kv_exchange.wait()
            grad_exchange.start([block_dk, block_dv])
        # After P hops the accumulator of our own block is back, with every rank's share.
        dk, dv = grad_exchange.wait()
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None, None, None, None, None)


def _travelling_block(k, v, doc_ids):
    """What travels around the ring: the keys and values (B, T, KV, D) of a block, with their
    document ids (B, T) when there is a document mask."""
    return [k, v, doc_ids]


def _rank_in_group(group):
    """(rank, world_size) of this process in `group` (None: the default group), or a
    ValueError saying why the group cannot be used."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring attention and zigzag sharding need torch.distributed to be "
                         "initialised (dist.init_process_group) before they are called.")
    group_size, world_size = dist.get_world_size(group), dist.get_world_size()
    if group_size < 0:
        raise ValueError("this process is not a member of the process group it was given.")
    if group_size > world_size:
        raise ValueError(f"the process group has {group_size} ranks but the world has only "
                         f"{world_size} processes.")
    rank = dist.get_rank(group)
    return rank, group_size


def ring_attention(q, k, v, group, causal=True, doc_ids=None, *, scale=None,
                   block_size=DEFAULT_BLOCK_SIZE):
    """Exact attention over a sequence split across the ranks of `group` (context parallel).

    q (B, T, H, D), k/v (B, T, KV, D) and doc_ids (B, T) are THIS rank's zigzag shard
    (zigzag_shard with the same group), T = total length / P. Returns this rank's rows of the
    output, (B, T, H, D) in q's dtype. Differentiable: the gradients of q, k and v are this
    rank's shards of the full gradients, exactly. Works with gloo (CPU) and NCCL (GPU).
    """
    _check_attention_inputs(q, k, v, doc_ids)
    rank, world_size = _rank_in_group(group)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention needs q and k/v shards of the same length, got "
                         f"{q.shape[1]} and {k.shape[1]}.")
    if q.shape[1] % 2 != 0:
        raise ValueError(f"a zigzag shard holds two equal chunks, so its length must be even, "
                         f"got {q.shape[1]}: the sequence length must be divisible by "
                         f"2 x cp = {2 * world_size}.")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, doc_ids, group, rank, world_size, causal, scale,
                                block_size)


# ---------------------------------------------------------------------------------------------
# 6. Zigzag sharding
# ---------------------------------------------------------------------------------------------
# Causal attention is triangular: cutting the sequence into P consecutive pieces would give the
# last rank P times the work of the first. Cutting it into 2P chunks and giving rank r the
# chunks r and 2P-1-r pairs a cheap chunk with an expensive one, so every rank does the same
# work. Tokens, labels, positions and the loss mask must all be split with this one
# permutation, and RoPE must use the positions a rank actually holds:
#
#     tokens, labels, loss_mask = (zigzag_shard(x, 1, cp_group) for x in (tokens, labels, mask))
#     positions = zigzag_shard(torch.arange(seq_len), 0, cp_group)  # [0,1,6,7] on rank 0 of 2

def zigzag_ranges(seq_len, rank, world_size):
    """The two [start, stop) ranges of global positions held by `rank`: chunks rank and 2P-1-rank
    of 2P. The one definition of the zigzag layout (data.Loader reads these ranges from disk)."""
    n_chunks = 2 * world_size
    if seq_len % n_chunks != 0:
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 x cp = {n_chunks} "
                         f"for zigzag sharding.")
    chunk = seq_len // n_chunks
    first, second = rank * chunk, (n_chunks - 1 - rank) * chunk
    return [(first, first + chunk), (second, second + chunk)]


def zigzag_indices(seq_len, rank, world_size):
    """The global positions held by `rank`, in order: chunks rank and 2P-1-rank of 2P."""
    return torch.cat([torch.arange(start, stop) for start, stop in zigzag_ranges(seq_len, rank, world_size)])


def zigzag_shard(x, dim, group):
    """This rank's zigzag shard of x along `dim` (x holds the full sequence on every rank)."""
    rank, world_size = _rank_in_group(group)
    positions = zigzag_indices(x.shape[dim], rank, world_size).to(x.device)
    return x.index_select(dim, positions)


def zigzag_unshard(x, dim, group):
    """The inverse of zigzag_shard: gathers every rank's shard and returns the full sequence,
    in order, on every rank. Not differentiable (for outputs, metrics and tests)."""
    rank, world_size = _rank_in_group(group)
    # gloo cannot gather bools: gather them as bytes.
    sendable = x.to(torch.uint8) if x.dtype == torch.bool else x
    shards = [torch.empty_like(sendable) for _ in range(world_size)]
    dist.all_gather(shards, sendable.contiguous(), group=group)
    seq_len = x.shape[dim] * world_size
    full_shape = list(x.shape)
    full_shape[dim] = seq_len
    full = sendable.new_empty(full_shape)
    for shard_rank, shard in enumerate(shards):
        positions = zigzag_indices(seq_len, shard_rank, world_size).to(x.device)
        full.index_copy_(dim, positions, shard)
    return full.to(x.dtype)
