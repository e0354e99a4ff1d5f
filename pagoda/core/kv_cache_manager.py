"""Per-request KV-cache block bookkeeping on top of the block pool.

The scheduler asks for prefix-cache hits and for room for the tokens it schedules; the manager answers with
block lists and records the copy-on-write copies the model runner must do before the step runs.
"""

from __future__ import annotations

from pagoda.core.block_pool import BlockPool, KVCacheBlock
from pagoda.core.request import Request
from pagoda.utils import cdiv


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for copy-on-write

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> list[KVCacheBlock]:
        """Leading full blocks of the request found in the prefix cache. The last token is always recomputed
        (its logits are needed); prompt-logprob and pooling requests bypass the cache."""
        if not self.enable_caching or request.needs_all_prompt_states:
            return []
        hashes = request.update_block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens (after the prefix hits in ``computed_blocks``).

        Returns False, changing nothing, when the pool can't provide it. A last block shared with a sibling
        sample (after a fork) that is about to be written gets copied first (copy-on-write).
        """
        blocks = self.req_blocks.get(request.request_id)
        if blocks and not computed_blocks:
            # The steady state of a running request: its blocks already have room and its last block is its own.
            num_computed = request.num_computed_tokens
            if (num_computed + num_new_tokens <= len(blocks) * self.block_size
                    and (num_computed % self.block_size == 0 or blocks[-1].ref_cnt == 1)):
                return True
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(computed_blocks)
        needs_copy = bool(blocks) and num_computed % self.block_size != 0 and blocks[-1].ref_cnt > 1
        # Hits on free cached blocks take those blocks off the free queue too.
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(num_required, 0) + needs_copy + revived > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            request.num_hashed_blocks = len(blocks)
        if needs_copy:
            shared = blocks[-1]
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((shared.block_id, copy.block_id))
            self.pool.free([shared])
            blocks[-1] = copy
        if num_required > 0:
            blocks.extend(self.pool.allocate(num_required))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Enter the request's newly computed full blocks into the prefix cache. Called for every running request
        after every step; a decode completes a block once every ``block_size`` steps, so the first test (on the
        request alone) ends most calls."""
        if not self.enable_caching or request.num_computed_tokens < (request.num_hashed_blocks + 1) * self.block_size:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = request.num_hashed_blocks
        if num_full <= start:
            return
        hashes = request.update_block_hashes(self.block_size)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        request.num_hashed_blocks = num_full

    def free_blocks_past(self, request: Request, num_slots: int) -> bool:
        """Give back the request's trailing blocks beyond the first ``num_slots`` token slots (speculative
        decoding's rollback of rejected drafts); True if any was freed."""
        blocks = self.req_blocks.get(request.request_id)
        keep = cdiv(num_slots, self.block_size)
        if not blocks or len(blocks) <= keep:
            return False
        self.pool.free(reversed(blocks[keep:]))
        del blocks[keep:]
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` the parent's blocks (shared, reference-counted)."""
        blocks = list(self.req_blocks.get(parent.request_id, ()))
        self.pool.touch(blocks)
        self.req_blocks[child.request_id] = blocks
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.block_hashes = list(parent.block_hashes)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, None)
        request.num_hashed_blocks = 0
        if blocks:
            self.pool.free(reversed(blocks))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def take_fresh_blocks(self) -> list[int]:
        """Blocks handed out for the first time since the cache was created; the runner zeroes them."""
        fresh, self.pool.fresh_block_ids = self.pool.fresh_block_ids, []
        return fresh
