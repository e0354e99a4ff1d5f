"""The random dataset: reproducible, token ids in range, lengths as asked."""

import pytest

from pagoda.benchmarks.datasets import TOKEN_ID_HIGH, TOKEN_ID_LOW, random_requests


def test_same_seed_same_requests_and_ids_in_range():
    a = random_requests(5, 64, 8, seed=3)
    b = random_requests(5, 64, 8, seed=3)
    c = random_requests(5, 64, 8, seed=4)
    assert a == b and a != c
    assert all(r.prompt_len == 64 and r.output_len == 8 for r in a)
    ids = [t for r in a for t in r.prompt_token_ids]
    assert TOKEN_ID_LOW <= min(ids) and max(ids) < TOKEN_ID_HIGH
    assert len(set(ids)) > 200  # random, not a repeated pattern


def test_small_vocabulary_clips_ids():
    ids = [t for r in random_requests(4, 100, 1, vocab_size=64, seed=0) for t in r.prompt_token_ids]
    assert max(ids) < 64 and min(ids) >= 0


def test_range_ratio_spreads_lengths():
    requests = random_requests(200, 100, 20, range_ratio=0.5, seed=1)
    in_lens = [r.prompt_len for r in requests]
    out_lens = [r.output_len for r in requests]
    assert 50 <= min(in_lens) < 60 and 140 < max(in_lens) <= 150
    assert 10 <= min(out_lens) and max(out_lens) <= 30


@pytest.mark.parametrize("kwargs, message", [({"range_ratio": 1.0}, "random_range_ratio"),
                                             ({"input_len": 0}, "input_len"), ({"num_prompts": 0}, "num_prompts")])
def test_bad_arguments_name_the_field(kwargs, message):
    args = {"num_prompts": 2, "input_len": 8, "output_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        random_requests(**args)
