"""The pool of KV-cache blocks: reference counts, the prefix-cache map and the LRU free queue.

A block is free when its reference count is zero. A free block may still hold a cached prefix (it has a
hash): it stays findable in ``cached`` until it is handed out again, and the free queue hands out the least
recently freed block first, so cached prefixes are evicted in LRU order. All operations are O(1) per block.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The chain starts from a secret drawn once per process: without it, a client who knows the scheme could
# precompute keys; with it, keys differ from run to run and can't be predicted or forged from outside.
_PROCESS_SEED = os.urandom(32)


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and its tokens are known

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


def root_hash(cache_salt: str | None = None, lora_request: Any = None) -> bytes:
    """The parent key of a request's first block: the process seed, and the request's ``cache_salt`` and LoRA
    adapter id if it has them, so requests with different salts or adapters (or an adapter and the base model)
    never share a block (every later key chains from this one)."""
    if cache_salt is None and lora_request is None:
        return hashlib.sha256(_PROCESS_SEED).digest()
    salt = (cache_salt or "").encode()
    key = _PROCESS_SEED + len(salt).to_bytes(8, "little") + salt
    if lora_request is not None:
        key += b"lora" + lora_request.lora_int_id.to_bytes(8, "little")
    return hashlib.sha256(key).digest()


def hash_block_tokens(parent_hash: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 over the parent block's key and this block's token ids.

    Built-in ``hash`` is not fit here: ints and tuples hash the same in every process and collisions are easy
    to construct (``hash(-1) == hash(-2)``, ids that differ by 2**61 - 1), which would let one client's prompt
    be served another's KV cache. A 32-byte parent key and fixed-width ids make the input unambiguous, so equal
    keys mean equal whole prefixes (and salts) unless SHA-256 collides.
    """
    return hashlib.sha256(parent_hash + array("q", tokens).tobytes()).digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Free blocks by id, least recently freed first (OrderedDict gives O(1) removal from the middle).
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, KVCacheBlock] = {}
        # The cache tensors start uninitialized (zero-filling gigabytes up front is slow); a block is zeroed the
        # first time it is handed out, so padding positions attention masks out never hold NaN garbage.
        self._never_used = [True] * num_blocks
        self.fresh_block_ids: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def allocate(self, num: int) -> list[KVCacheBlock]:
        """Hand out ``num`` free blocks (evicting the cached prefixes they held)."""
        if num > len(self.free_queue):
            raise RuntimeError(f"asked for {num} blocks with only {len(self.free_queue)} free")
        out = []
        for _ in range(num):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            if self._never_used[block.block_id]:
                self._never_used[block.block_id] = False
                self.fresh_block_ids.append(block.block_id)
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (or shared by a fork)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference; blocks reaching zero join the tail of the free queue. Callers pass a request's
        blocks tail first so that a prefix's later blocks are evicted before its earlier ones."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"{block} freed more often than referenced")
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> None:
        """Make a full block findable by its prefix hash (the first block with a given hash wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached.clear()
        for block in self.blocks:
            block.block_hash = None
        return True
