"""The output processor's per-token shortcut past check_stop: wherever it skips the call, check_stop says go on."""

from __future__ import annotations

import random

from pagoda.core.detokenizer import check_stop
from pagoda.core.output_processor import _quick_stop_rule
from pagoda.core.request import Request
from pagoda.sampling_params import SamplingParams

EOS = {2, 7}


def test_skipping_check_stop_never_misses_a_stop():
    rng = random.Random(11)
    decided = skipped = 0
    for case in range(400):
        prompt = list(range(rng.randrange(1, 30)))
        max_model_len = rng.choice([None, len(prompt) + rng.randrange(1, 40)])
        max_tokens = rng.choice([None, rng.randrange(1, 30)])
        min_tokens = min(rng.choice([0, 0, rng.randrange(0, 8)]), max_tokens or 8)
        params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=rng.random() < 0.3,
                                stop_token_ids=rng.sample(range(12), rng.randrange(0, 3)))
        request = Request(f"r{case}", prompt, params, eos_token_ids=EOS)
        limit, stops = _quick_stop_rule(request, max_model_len)
        outputs: list[int] = []
        for _ in range(45):
            outputs.append(rng.randrange(12))
            decision = check_stop(params, outputs, EOS, num_prompt_tokens=len(prompt), max_model_len=max_model_len)
            if len(outputs) < limit and outputs[-1] not in stops:
                skipped += 1
                assert decision is None, (params, max_model_len, outputs)
            if decision is not None:
                decided += 1
                break
    assert decided > 200 and skipped > 1000  # both sides of the rule were exercised
