"""The xgrammar backend: the vocabulary as xgrammar sees it, grammar compilation off the engine thread, and one
``GrammarMatcher`` per sequence.

``TokenizerInfo`` is built from the engine's tokenizer (a Hugging Face one, or the fast tokenizer the GGUF loader
builds from a file's metadata) with the *model's* vocabulary size, which sizes the token bitmask to the logits;
its stop tokens are the engine's EOS ids, so a grammar allows EOS exactly where its language may end. It is built
lazily, on the compile thread, by the first constrained request: engines that never see one pay nothing.

Compiling a grammar against a 50k-token vocabulary takes milliseconds to seconds, so it runs on a small thread
pool; futures are cached by :class:`~pagoda.core.structured_output.grammar_spec.GrammarSpec`, so a schema that
many requests share is compiled once, and requests that arrive while it compiles wait on the same future.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pagoda.core.structured_output.grammar_spec import GrammarSpec, parse_grammar
from pagoda.logger import init_logger

logger = init_logger(__name__)

COMPILE_THREADS = 2  # compile jobs at once; each may use xgrammar's own threads too
MAX_CACHED_GRAMMARS = 1024  # compiled grammars kept (least recently used dropped first)


class XgrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: OrderedDict[GrammarSpec, Future] = OrderedDict()

    def compile_async(self, spec: GrammarSpec) -> Future:
        """The compiled grammar of ``spec``, as a future (already done for a cached grammar)."""
        future = self._futures.get(spec)
        if future is not None and not (future.done() and future.exception() is not None):
            self._futures.move_to_end(spec)
            return future
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="pagoda-grammar")
        future = self._pool.submit(self._compile, spec)
        self._futures[spec] = future
        while len(self._futures) > MAX_CACHED_GRAMMARS:
            self._futures.popitem(last=False)
        return future

    def matcher(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ compile threads
    def _compile(self, spec: GrammarSpec) -> Any:
        return self.compiler().compile_grammar(parse_grammar(spec))

    def compiler(self) -> Any:
        """The ``GrammarCompiler`` (built once, on first use: building the vocabulary info takes ~0.1 s)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                # xgrammar's own cache is off: ours keys on the spec and also holds in-flight compilations.
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
                logger.info("structured outputs: xgrammar ready (%s vocabulary of %d tokens, stop tokens %s)",
                            info.vocab_type.name.lower(), self.vocab_size, list(info.stop_token_ids))
            return self._compiler
