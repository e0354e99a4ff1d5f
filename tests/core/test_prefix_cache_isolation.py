"""The prefix cache shares KV blocks only between identical prefixes of the same ``cache_salt``: keys are a
SHA-256 chain from a per-process secret, so prefixes crafted to collide under Python's ``hash`` stay apart."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagoda.core.block_pool import hash_block_tokens, root_hash
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request
from pagoda.sampling_params import SamplingParams

BLOCK = 4
MERSENNE_61 = 2**61 - 1  # CPython hashes ints modulo this prime


def _cache(kv: KVCacheManager, rid: str, tokens: list[int], salt: str | None = None) -> None:
    """Run a request's prompt through the cache manager as the scheduler would, then free it (blocks stay
    findable in the prefix cache)."""
    request = Request(rid, tokens, SamplingParams(), cache_salt=salt)
    assert kv.allocate_slots(request, len(tokens))
    request.num_computed_tokens = len(tokens)
    kv.cache_computed_blocks(request)
    kv.free(request)


def _hits(kv: KVCacheManager, tokens: list[int], salt: str | None = None) -> int:
    return len(kv.get_computed_blocks(Request("probe", tokens, SamplingParams(), cache_salt=salt)))


@pytest.mark.parametrize("victim_first, forged_first", [(7, 7 + MERSENNE_61), (-1, -2)])
def test_a_builtin_hash_collision_does_not_alias(victim_first, forged_first):
    victim = [victim_first, 11, 12, 13, 14, 15, 16, 17, 99]
    forged = [forged_first, *victim[1:]]
    # the pair really collides under the old key, hash((parent, tokens)), block after block
    old_first = [hash((None, tuple(p[:BLOCK]))) for p in (victim, forged)]
    assert old_first[0] == old_first[1]
    assert hash((old_first[0], tuple(victim[BLOCK:2 * BLOCK]))) == hash((old_first[1], tuple(forged[BLOCK:2 * BLOCK])))

    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_caching=True)
    _cache(kv, "victim", victim)
    assert _hits(kv, victim) == 2  # the victim's own prefix is cached ...
    assert _hits(kv, forged) == 0  # ... and the forged prompt gets none of it


def test_different_salts_never_share_blocks():
    tokens = list(range(100, 113))  # three full blocks and a last token
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_caching=True)
    _cache(kv, "a", tokens, salt="tenant-a")
    assert _hits(kv, tokens, salt="tenant-a") == 3
    assert _hits(kv, tokens, salt="tenant-b") == 0
    assert _hits(kv, tokens) == 0  # no salt is a tenant of its own
    _cache(kv, "plain", tokens)
    assert _hits(kv, tokens) == 3 and _hits(kv, tokens, salt="tenant-b") == 0
    # salts are length-prefixed: ("ab", tokens) and ("a", "b"+tokens) can't meet
    assert root_hash("ab") != root_hash("a") and root_hash("") != root_hash()
    keys = {b.block_hash for b in kv.pool.blocks if b.block_hash is not None}
    assert len(keys) == 6 and all(isinstance(k, bytes) and len(k) == 32 for k in keys)


def test_keys_are_seeded_per_process():
    code = ("from pagoda.core.block_pool import hash_block_tokens, root_hash; "
            "print(hash_block_tokens(root_hash(), [1, 2]).hex())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 2 and hash_block_tokens(root_hash(), [1, 2]).hex() + "\n" not in runs


def test_engine_shares_cached_prompts_only_within_a_salt(tiny_model_dir):
    from pagoda import LLM

    llm = LLM(model=tiny_model_dir("llama"), dtype="float32", max_model_len=256, block_size=16,
              kv_cache_memory_bytes=8 << 20, skip_tokenizer_init=True)
    ids = list(range(5, 70))  # four full blocks of 16, plus one token
    params = SamplingParams(temperature=0, max_tokens=2, detokenize=False)

    def cached(salt: str | None) -> int:
        prompt = {"prompt_token_ids": ids} if salt is None else {"prompt_token_ids": ids, "cache_salt": salt}
        return llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens

    assert cached("a") == 0
    assert cached("a") == 64
    assert cached("b") == 0
    assert cached(None) == 0
    assert cached(None) == 64
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate([{"prompt_token_ids": ids, "cache_salt": ""}], params, use_tqdm=False)


def test_blocks_filled_by_decoding_enter_the_cache_as_they_fill(tiny_model_dir):
    """Generated tokens are cached block by block as the decode completes them, up to the last full block."""
    from pagoda import LLM

    llm = LLM(model=tiny_model_dir("llama"), dtype="float32", max_model_len=256, block_size=8,
              kv_cache_memory_bytes=8 << 20, skip_tokenizer_init=True)
    prompt = list(range(5, 13))  # one full block
    for num_generated in (17, 24):  # the last computed token ends block 3, or lies inside block 4
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
            temperature=0, max_tokens=num_generated, ignore_eos=True, detokenize=False), use_tqdm=False)[0]
        tokens = prompt + list(out.outputs[0].token_ids)
        # Every token but the last was computed: its full blocks are cached, decoded ones included.
        full_blocks = (len(tokens) - 1) // 8
        again = llm.generate([{"prompt_token_ids": tokens + [3]}], SamplingParams(max_tokens=1, detokenize=False),
                             use_tqdm=False)[0]
        assert again.num_cached_tokens == 8 * full_blocks
