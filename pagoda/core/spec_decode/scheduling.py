"""The scheduler's side of speculative decoding: how many of a request's drafts fit this step, and the
bookkeeping after verification (accepted tokens in, rejected tokens' KV slots rolled back)."""

from __future__ import annotations

from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request


def drafts_to_schedule(request: Request, room: int, max_model_len: int) -> list[int]:
    """The drafts to verify with the request's last token: no more than the step's remaining budget (``room``),
    and none that could only produce tokens past ``max_tokens`` or the context length (a step yields up to
    ``d + 1`` tokens)."""
    num = min(len(request.spec_token_ids), room, max_model_len - request.num_tokens - 1)
    max_tokens = request.params.max_tokens
    if max_tokens is not None:
        num = min(num, max_tokens - len(request.output_token_ids) - 1)
    return request.spec_token_ids[:num] if num > 0 else []


def record_verified(kv: KVCacheManager, request: Request, tokens: list[int], num_lookahead: int) -> bool:
    """After a verification step: append the accepted tokens (and the corrected or bonus one) and roll the KV
    back to them. Every token but the newest is now computed; the slots of rejected drafts hold garbage that
    the next step overwrites. Blocks past what the request's tokens (plus the draft model's lookahead) need are
    freed, and only then are full blocks entered into the prefix cache, so a rejected token never is. Returns
    True when blocks were freed (the runner must then be sent the request's new block list)."""
    for token in tokens:
        request.append_token(token)
    request.num_computed_tokens = request.num_tokens - 1
    freed = kv.free_blocks_past(request, request.num_tokens + num_lookahead)
    kv.cache_computed_blocks(request)
    return freed
