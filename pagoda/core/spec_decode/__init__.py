"""Speculative decoding: cheap proposals of the next k tokens, verified by the target model in one forward pass.

``config.py`` (``--speculative-config``), ``proposer.py`` (the interface), ``ngram.py`` and ``draft_model.py``
(the proposers), ``rejection_sampler.py`` (acceptance), ``decoder.py`` (the model runner's hooks),
``scheduling.py`` (the scheduler's hooks) and ``metrics.py`` (the counters behind ``/metrics`` and the logs).
"""
