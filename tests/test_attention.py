"""attention.py against the plain definition (reference_attention), forward AND backward.

Multi-process tests spawn 1, 2 and 4 gloo processes on CPU; each builds the same inputs from a
seed, runs the single-device reference itself, compares its shard of the output and of the
gradients, and reports every failure back to the parent, where the test asserts.
"""

import math
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import attention
from gloo import run_on_gloo
from attention import (
    _attention_tiles, attention_block_backward, attention_block_forward, chunked_attention,
    merge_partial_attention, reference_attention, ring_attention, zigzag_indices,
)

TOLERANCE = 1e-5  # relative error, fp32


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def random_qkv(batch, n_queries, n_keys, n_heads, n_kv_heads, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_queries, n_heads, head_dim, generator=generator)
    k = torch.randn(batch, n_keys, n_kv_heads, head_dim, generator=generator)
    v = torch.randn(batch, n_keys, n_kv_heads, head_dim, generator=generator)
    dout = torch.randn(batch, n_queries, n_heads, head_dim, generator=generator)
    return q, k, v, dout


def document_ids(batch, seq_len, n_docs=3, seed=0, contiguous=True):
    """Packed documents (sorted ids) or, with contiguous=False, ids in any order."""
    ids = torch.randint(0, n_docs, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids.sort(dim=1).values if contiguous else ids


def output_and_grads(attention_fn, q, k, v, dout):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention_fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def reference_output_and_grads(q, k, v, dout, causal, doc_ids):
    return output_and_grads(lambda q, k, v: reference_attention(q, k, v, causal, doc_ids)[0],
                            q, k, v, dout)


def assert_close(actual, expected, names=("out", "dq", "dk", "dv")):
    for name, a, e in zip(names, actual, expected):
        error = relative_error(a, e)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


# --- the reference itself ---------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_pytorch_sdpa(causal):
    q, k, v, _ = random_qkv(2, 24, 24, 4, 2)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
        enable_gqa=True).transpose(1, 2)
    out, lse = reference_attention(q, k, v, causal)
    assert relative_error(out, expected) <= TOLERANCE
    assert lse.shape == (2, 4, 24) and lse.dtype == torch.float32


# --- one block ----------------------------------------------------------------------------------

def _heads(x):
    return x.transpose(1, 2)


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_and_backward(kernel, causal):
    q, k, v, dout = random_qkv(2, 20, 20, 4, 2)
    scale = 1 / math.sqrt(q.shape[-1])
    forward, backward = attention_block_forward, attention_block_backward
    if kernel == "math":  # the path of masked blocks, here with a mask that hides nothing
        hides_nothing = torch.ones(2, 20, 20, dtype=torch.bool)
        forward = partial(attention_block_forward, mask=hides_nothing)
        backward = partial(attention_block_backward, mask=hides_nothing)
    out, lse = forward(_heads(q), _heads(k), _heads(v), scale, causal)
    grads = backward(_heads(dout), _heads(q), _heads(k), _heads(v), out, lse, scale, causal)
    expected_out, expected_lse = reference_attention(q, k, v, causal)
    _, *expected_grads = reference_output_and_grads(q, k, v, dout, causal, None)
    assert relative_error(_heads(out), expected_out) <= TOLERANCE
    assert relative_error(lse, expected_lse) <= TOLERANCE
    assert_close([_heads(g) for g in grads], expected_grads, names=("dq", "dk", "dv"))


@pytest.mark.parametrize("math_rows", [512, 3])  # 3: the math path's row chunks, uneven
def test_math_block_with_document_mask(math_rows, monkeypatch):
    monkeypatch.setattr(attention, "MATH_ROWS", math_rows)
    q, k, v, dout = random_qkv(2, 20, 20, 4, 2)
    doc_ids = document_ids(2, 20, contiguous=False)
    mask = doc_ids[:, :, None] == doc_ids[:, None, :]
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = attention_block_forward(_heads(q), _heads(k), _heads(v), scale, True, mask)
    grads = attention_block_backward(_heads(dout), _heads(q), _heads(k), _heads(v), out, lse,
                                     scale, True, mask)
    expected = reference_output_and_grads(q, k, v, dout, True, doc_ids)
    assert_close([_heads(out)] + [_heads(g) for g in grads], expected)


# --- the merge ----------------------------------------------------------------------------------

def test_merge_of_two_key_blocks_is_exact():
    q, k, v, _ = random_qkv(2, 16, 30, 4, 2)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.zeros(_heads(q).shape)
    lse = torch.full(out.shape[:3], float("-inf"))
    for keys in (slice(0, 11), slice(11, 30)):
        block_out, block_lse = attention_block_forward(
            _heads(q), _heads(k[:, keys]), _heads(v[:, keys]), scale)
        merge_partial_attention(out, lse, block_out, block_lse)
    expected_out, expected_lse = reference_attention(q, k, v, causal=False)
    assert relative_error(_heads(out), expected_out) <= TOLERANCE
    assert relative_error(lse, expected_lse) <= TOLERANCE


def test_merge_is_safe_with_fully_masked_blocks():
    q, k, v, _ = random_qkv(1, 8, 8, 2, 2)
    scale = 1 / math.sqrt(q.shape[-1])
    # A block that hides every key, as the document mask does between two documents.
    hide_everything = torch.zeros(1, 8, 8, dtype=torch.bool)
    empty_out, empty_lse = attention_block_forward(_heads(q), _heads(k), _heads(v), scale,
                                                   mask=hide_everything)
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()

    # empty + empty stays empty, with no NaN
    out, lse = torch.zeros(empty_out.shape), torch.full(empty_lse.shape, float("-inf"))
    merge_partial_attention(out, lse, empty_out, empty_lse)
    assert (out == 0).all() and torch.isneginf(lse).all()

    # empty + real = real, and real + empty = real
    real_out, real_lse = attention_block_forward(_heads(q), _heads(k), _heads(v), scale)
    merge_partial_attention(out, lse, real_out, real_lse)
    merge_partial_attention(out, lse, empty_out, empty_lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, real_out) <= TOLERANCE and relative_error(lse, real_lse) == 0


# --- chunked attention ----------------------------------------------------------------------------

def test_causal_tiles_above_the_diagonal_are_skipped():
    tiles = list(_attention_tiles(range(64), range(64), causal=True, block_size=16))
    assert len(tiles) == 4 + 6  # 4 diagonal tiles, 6 below it, none of the 6 above it
    for rows, cols, is_diagonal, mask in tiles:
        assert cols.stop <= rows.stop and (is_diagonal or cols.stop <= rows.start)
        assert mask is None
    assert len(list(_attention_tiles(range(64), range(64), causal=False, block_size=16))) == 16


CHUNKED_CASES = [
    # (seq, n_heads, n_kv_heads, causal, documents, block_size)
    (64, 4, 2, True, None, 16),      # a multiple of the block size
    (61, 4, 2, True, None, 16),      # not a multiple
    (61, 4, 2, False, None, 16),
    (61, 4, 1, True, None, 4096),    # one block (multi-query attention)
    (64, 4, 4, True, "packed", 16),  # plain multi-head attention, packed documents
    (61, 6, 2, True, "packed", 7),
    (61, 4, 2, False, "any order", 7),
    (61, 4, 2, True, "any order", 16),
]


@pytest.mark.parametrize("seq, n_heads, n_kv_heads, causal, documents, block_size", CHUNKED_CASES)
def test_chunked_attention_matches_reference(seq, n_heads, n_kv_heads, causal, documents,
                                             block_size):
    q, k, v, dout = random_qkv(2, seq, seq, n_heads, n_kv_heads)
    doc_ids = None if documents is None else document_ids(2, seq,
                                                          contiguous=documents == "packed")
    actual = output_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, causal, doc_ids, block_size=block_size),
        q, k, v, dout)
    assert_close(actual, reference_output_and_grads(q, k, v, dout, causal, doc_ids))


@pytest.mark.parametrize("n_queries", [13, 1])
@pytest.mark.parametrize("with_documents", [False, True])
def test_chunked_attention_against_a_kv_cache(n_queries, with_documents):
    """Queries are the last positions of the keys (prefill in chunks, then Tq=1 decode)."""
    q, k, v, dout = random_qkv(2, n_queries, 50, 4, 2)
    doc_ids = document_ids(2, 50) if with_documents else None
    actual = output_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, True, doc_ids, block_size=16), q, k, v, dout)
    assert_close(actual, reference_output_and_grads(q, k, v, dout, True, doc_ids))


def test_chunked_attention_is_deterministic_under_checkpoint():
    q, k, v, dout = random_qkv(1, 40, 40, 4, 2)
    plain = output_and_grads(lambda q, k, v: chunked_attention(q, k, v, block_size=16),
                             q, k, v, dout)
    recomputed = output_and_grads(
        lambda q, k, v: checkpoint(chunked_attention, q, k, v, block_size=16,
                                   use_reentrant=False), q, k, v, dout)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_chunked_attention_returns_the_input_dtype():
    q, k, v, _ = random_qkv(1, 20, 20, 4, 2)
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_size=8)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference_attention(q, k, v)[0]) < 2e-2


CUDA_KERNELS = [  # (kernel, dtype, tolerance)
    ("CUDNN_ATTENTION", torch.bfloat16, 2e-2),
    ("FLASH_ATTENTION", torch.bfloat16, 2e-2),
    ("EFFICIENT_ATTENTION", torch.float32, 1e-4),  # fp32 always takes this one
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("documents", [None, "packed"])
@pytest.mark.parametrize("kernel, dtype, tolerance", CUDA_KERNELS)
def test_chunked_attention_with_each_cuda_kernel(kernel, dtype, tolerance, documents):
    """The blocks run the kernel SDPA would pick; force each in turn (GQA, 8 on 2 heads)."""
    backend = getattr(SDPBackend, kernel)
    q, k, v, dout = (x.cuda() for x in random_qkv(1, 1000, 1000, 8, 2, head_dim=64))
    doc_ids = None if documents is None else document_ids(1, 1000).cuda()
    low = [x.to(dtype) for x in (q, k, v, dout)]
    with sdpa_kernel(backend):
        if attention._cuda_kernel(*(x.transpose(1, 2) for x in low[:3]), 0.125, True) != backend:
            pytest.skip(f"{kernel} is not available here")
        actual = output_and_grads(
            lambda q, k, v: chunked_attention(q, k, v, True, doc_ids, block_size=256), *low)
    expected = reference_output_and_grads(q, k, v, dout, True, doc_ids)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        error = relative_error(a, e)
        assert error <= tolerance, f"{name}: relative error {error:.2e} ({dtype})"


# --- bad input: one sentence each -------------------------------------------------------------

def test_bad_inputs_are_rejected_with_a_sentence():
    q, k, v, _ = random_qkv(1, 8, 8, 6, 4)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        chunked_attention(q, k, v)
    q, k, v, _ = random_qkv(1, 8, 8, 4, 2)
    with pytest.raises(ValueError, match="same shape"):
        chunked_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        chunked_attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="doc_ids must be shaped"):
        chunked_attention(q, k, v, doc_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by 2 x cp = 6"):
        zigzag_indices(8, 0, 3)
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        ring_attention(q, k, v, group=None)


def test_zigzag_indices():
    assert zigzag_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    everything = torch.cat([zigzag_indices(32, rank, 4) for rank in range(4)])
    assert sorted(everything.tolist()) == list(range(32))


# --- ring attention over 1, 2 and 4 gloo processes ----------------------------------------------

RING_CASES = [
    # (total seq, n_heads, n_kv_heads, causal, documents, block_size)
    (32, 4, 2, True, None, 4),         # chunks are a multiple of the block size
    (48, 4, 2, True, None, 5),         # they are not
    (48, 4, 2, True, "packed", 5),
    (40, 4, 2, False, "any order", 3),
    (40, 4, 2, False, None, 64),
    (64, 4, 1, True, None, 4096),      # one block per step, multi-query attention
    (48, 6, 2, True, "any order", 4),
]


class _GroupLargerThanTheWorld:
    def size(self):
        return 1024


def zigzag_shard(x, group):
    """This rank's zigzag shard of x (B, T, ...), which holds the full sequence on every rank."""
    return x[:, zigzag_indices(x.shape[1], dist.get_rank(group), dist.get_world_size(group))]


def zigzag_unshard(x, group):
    """The full sequence (B, T, ...), in order, from every rank's shard x."""
    world_size = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous(), group=group)
    full = x.new_empty(x.shape[0], x.shape[1] * world_size, *x.shape[2:])
    for shard_rank, shard in enumerate(shards):
        full[:, zigzag_indices(full.shape[1], shard_rank, world_size)] = shard
    return full


def _compare_ring_with_reference(group, case):
    """Failure messages (none if all is well) of ring attention on `group` for one case."""
    seq, n_heads, n_kv_heads, causal, documents, block_size = case
    q, k, v, dout = random_qkv(2, seq, seq, n_heads, n_kv_heads, seed=seq)
    doc_ids = None if documents is None else document_ids(2, seq,
                                                          contiguous=documents == "packed")
    expected = reference_output_and_grads(q, k, v, dout, causal, doc_ids)

    def shard(x):
        return zigzag_shard(x, group)

    local_doc_ids = None if doc_ids is None else shard(doc_ids)
    local = output_and_grads(
        lambda q, k, v: ring_attention(q, k, v, group, causal, local_doc_ids,
                                       block_size=block_size),
        shard(q), shard(k), shard(v), shard(dout))
    failures = []
    for name, a, e in zip(("out", "dq", "dk", "dv"), local, expected):
        error = relative_error(zigzag_unshard(a, group), e)
        if not error <= TOLERANCE:
            failures.append(f"rank {dist.get_rank()} of a cp group of {dist.get_world_size(group)}"
                            f", case {case}: {name} relative error {error:.2e}")
    return failures


def _ring_checks(rank, world_size):
    """Every check one rank makes; returns a list of failure messages."""
    group = dist.group.WORLD
    failures = []
    for case in RING_CASES:
        failures += _compare_ring_with_reference(group, case)
    failures += _compare_ring_with_reference(None, RING_CASES[1])  # None: the default group

    if world_size == 4:
        # a 2 (dp) x 2 (cp) mesh: rings over the groups {0, 1} and {2, 3}, whose ranks in the
        # group differ from their global ranks
        cp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        failures += _compare_ring_with_reference(cp_groups[rank // 2], RING_CASES[2])

    # bad input, one sentence each
    odd = 2 * world_size + 1
    q, k, v, _ = random_qkv(1, odd, odd, 4, 2)
    bad_calls = [
        (f"divisible by 2 x cp = {2 * world_size}", lambda: ring_attention(q, k, v, group)),
        (f"sequence length {odd} must be divisible", lambda: zigzag_indices(odd, rank, world_size)),
        ("has 1024 ranks but the world has only",
         lambda: ring_attention(q, k, v, _GroupLargerThanTheWorld())),
    ]
    for expected_words, call in bad_calls:
        try:
            call()
            failures.append(f"rank {rank}: no error, expected '{expected_words}'")
        except ValueError as error:
            if expected_words not in str(error):
                failures.append(f"rank {rank}: '{error}' does not say '{expected_words}'")
    return failures


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ring_attention_matches_single_device(world_size):
    failures = run_on_gloo(_ring_checks, world_size)
    assert not failures, "\n".join(failures)
