"""Block pool and KV-cache manager: reference counts, prefix hash chain, LRU eviction, copy-on-write."""

from __future__ import annotations

import pytest

from pagoda.core.block_pool import BlockPool, hash_block_tokens, root_hash
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request
from pagoda.sampling_params import SamplingParams


def _request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params))


def _all_free(kv: KVCacheManager) -> bool:
    return kv.num_free_blocks == kv.pool.num_blocks and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_hash_chain_depends_on_the_whole_prefix():
    root = root_hash()
    a = hash_block_tokens(root, (1, 2))
    assert hash_block_tokens(a, (3, 4)) != hash_block_tokens(hash_block_tokens(root, (9, 9)), (3, 4))
    assert hash_block_tokens(a, (3, 4)) == hash_block_tokens(hash_block_tokens(root, (1, 2)), (3, 4))


def test_pool_allocate_and_free_count_references():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1 and all(b.ref_cnt == 1 for b in blocks)
    pool.touch(blocks[:1])
    pool.free(blocks)
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(blocks[:1])
    with pytest.raises(RuntimeError, match="only 4 free"):
        pool.allocate(5)


def test_prefix_hits_and_lru_eviction():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    first = _request("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(first, 5)
    first.num_computed_tokens = 5
    kv.cache_computed_blocks(first)
    kv.free(first)
    assert _all_free(kv)
    # Same prefix: the two full blocks are found (the last token is always recomputed).
    again = _request("b", [1, 2, 3, 4, 9])
    hits = kv.get_computed_blocks(again)
    assert len(hits) == 2
    # A prompt that is entirely cached still leaves its last token to compute.
    exact = _request("c", [1, 2, 3, 4])
    assert len(kv.get_computed_blocks(exact)) == 1
    # Filling the pool with other tokens evicts the cached prefix, least recently freed first.
    other = _request("d", list(range(100, 108)))
    assert kv.allocate_slots(other, 8)
    assert kv.get_computed_blocks(again) == []
    kv.free(other)
    assert _all_free(kv)


def test_hit_on_a_free_cached_block_counts_against_free_space():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_caching=True)
    first = _request("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(first, 5)
    first.num_computed_tokens = 5
    kv.cache_computed_blocks(first)
    kv.free(first)
    second = _request("b", [1, 2, 3, 4, 6, 7, 8])
    hits = kv.get_computed_blocks(second)
    assert len(hits) == 2
    # 2 cached blocks + 2 new ones > 3 blocks: refused without changing anything.
    assert not kv.allocate_slots(second, 3, hits)
    assert _all_free(kv)
    assert kv.allocate_slots(second, 1, hits)
    assert kv.num_free_blocks == 0
    kv.free(second)
    assert _all_free(kv)


def test_fork_shares_blocks_and_copies_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    parent = _request("p", [1, 2, 3, 4, 5, 6])  # one full block and a partial one
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    children = [_request(f"{i}_p", parent.prompt_token_ids) for i in range(3)]
    for child in children:
        child.num_computed_tokens = 6
        kv.fork(parent, child)
    kv.free(parent)
    shared = list(kv.req_blocks["0_p"])
    assert all(kv.req_blocks[c.request_id] == shared for c in children)
    assert [b.ref_cnt for b in shared] == [3, 3]
    # The first child to write into the shared partial block gets its own copy of it.
    child = children[0]
    child.append_token(7)
    assert kv.allocate_slots(child, 1)
    copies = kv.take_pending_copies()
    assert copies == [(shared[1].block_id, kv.req_blocks["0_p"][1].block_id)]
    assert kv.req_blocks["0_p"][0] is shared[0] and shared[0].ref_cnt == 3 and shared[1].ref_cnt == 2
    for c in children:
        kv.free(c)
    assert _all_free(kv)
