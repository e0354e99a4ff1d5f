"""The input-grounded dataset of ``pagoda bench spec-decode``: "reproduce this passage with a small edit".

Each prompt holds a passage and asks for it back with one word replaced, so most of a good answer is a copy of
the input — the workload prompt-lookup (n-gram) speculation is made for, and a fair one for a draft model too.
With a chat template the instruction goes in a user message; without a tokenizer the prompt is the passage's
token ids twice around a separator (the model then tends to continue the repetition).
"""

from __future__ import annotations

from typing import Any

import numpy as np

PASSAGES = (
    ("The harbour town woke slowly. Fishing boats came back before dawn, their crews sorting the catch under "
     "yellow lamps while gulls circled the quay. By seven the bakery on the corner had its shutters up, and the "
     "smell of bread drifted down to the water, where the ferry waited with its engine idling and its ramp "
     "lowered for the first cars of the day.", "ferry", "steamer"),
    ("A good recipe for soup starts with patience. Onions are softened in butter over a low heat until they turn "
     "golden, then carrots, celery and a bay leaf go in. The stock is added warm, the pot is covered, and nothing "
     "more is done for an hour except to taste it now and then and add a pinch of salt when it needs one.",
     "carrots", "parsnips"),
    ("The library kept its rarest maps in a cool room on the top floor. Visitors signed a ledger, washed their "
     "hands and were given soft pencils, never pens. Each map lay flat in a wide drawer under a sheet of tissue, "
     "and the librarian would lift it out with both hands, as if it might still lead somewhere.",
     "librarian", "archivist"),
)


def grounded_prompts(tokenizer: Any, num: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``num`` prompts (token ids), cycling over the passages."""
    prompts = []
    for i in range(num):
        passage, old, new = PASSAGES[i % len(PASSAGES)]
        if tokenizer is None:
            rng = np.random.default_rng(seed + i)
            ids = rng.integers(min(100, vocab_size - 1), min(10000, vocab_size), size=160).tolist()
            prompts.append(ids + [ids[0]] * 4 + ids[:8])
            continue
        instruction = (f"Copy the passage below word for word, except replace the word \"{old}\" with \"{new}\".\n\n"
                       f"{passage}")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                                 add_generation_prompt=True, tokenize=False)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(instruction + "\n\nEdited passage:\n"))
    return prompts
