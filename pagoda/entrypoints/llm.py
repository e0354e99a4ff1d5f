"""``LLM``: offline batched inference with vLLM's API (``from pagoda import LLM, SamplingParams``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pagoda.beam_search import BeamSearchOutput
from pagoda.core.engine_args import EngineArgs
from pagoda.engine_dp import build_engine
from pagoda.entrypoints.chat_utils import apply_chat_template
from pagoda.entrypoints.llm_pooling import LLMPoolingMixin
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

PromptType = str | dict[str, Any] | list[int]


class LLM(LLMPoolingMixin):
    """A model loaded for offline generation.

    ``LLM(model=...)`` takes every :class:`~pagoda.core.engine_args.EngineArgs` field as a keyword; with no
    model it loads the bundled default. An unknown keyword is a ``ValueError`` listing the valid ones.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = build_engine(self.engine_args)  # an LLMEngine, or data-parallel replicas behind one
        self._counter = itertools.count()

    # ------------------------------------------------------------------ accessors
    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.llm_engine.tokenizer = tokenizer
        self.llm_engine.output_processor.tokenizer = tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
                 *, prompt_token_ids: list[list[int]] | None = None, lora_request: Any = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (a string, a list of strings, ``{"prompt_token_ids": [...]}``
        dicts, or lists of token ids); outputs come back in input order. ``lora_request``: one ``LoRARequest`` for
        every prompt, or a list with one (or None) per prompt."""
        if prompts is None:
            if prompt_token_ids is None:
                raise ValueError("prompts: give prompts (or prompt_token_ids)")
            prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        prompt_list = self._as_list(prompts)
        params_list = self._params_for(prompt_list, sampling_params)
        return self._run(prompt_list, params_list, use_tqdm, self._loras_for(prompt_list, lora_request))

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: Any = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """The ``params.beam_width`` best sequences of each prompt (a string, token ids or a
        ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}`` dict), best first; see ``docs/decoding.md``."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params: must be a BeamSearchParams, got {type(params).__name__}")
        from pagoda.entrypoints.llm_beam_search import beam_search_outputs

        prompt_list = self._as_list(prompts)
        return beam_search_outputs(self._run(prompt_list, [params] * len(prompt_list), use_tqdm,
                                             self._loras_for(prompt_list, lora_request)),
                                   self.llm_engine.tokenizer)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: Any = None, **kwargs: Any) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages) or a list of them,
        rendered with the tokenizer's chat template (or ``chat_template``)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = apply_chat_template(tokenizer, conversation, chat_template, add_generation_prompt,
                                       continue_final_message, {**(chat_template_kwargs or {}), **kwargs})
            # The template already holds the special tokens (BOS …): don't let the tokenizer add them again.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _as_list(prompts: Any) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            if prompts and all(isinstance(t, int) for t in prompts):
                return [list(prompts)]  # one prompt given as token ids
            return list(prompts)
        raise ValueError(f"prompts must be a string, a dict, token ids or a list of those, got "
                         f"{type(prompts).__name__}")

    def _params_for(self, prompts: list[PromptType], params: Any) -> list[SamplingParams]:
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts; give one, or one per "
                             "prompt")
        return params

    @staticmethod
    def _loras_for(prompts: list[PromptType], lora_request: Any) -> list[Any]:
        if lora_request is None or not isinstance(lora_request, (list, tuple)):
            return [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError(f"lora_request: got {len(lora_request)} for {len(prompts)} prompts; give one, or one "
                             "per prompt")
        return list(lora_request)

    def _run(self, prompts: list[PromptType], params_list: list[Any], use_tqdm: bool,
             loras: list[Any] | None = None) -> list[Any]:
        """Add every prompt, step until all are finished, return the final outputs in input order (sampling or
        pooling requests alike)."""
        engine = self.llm_engine
        ids: list[str] = []
        results: dict[str, Any] = {}
        bar = None
        try:
            # Inside the try: a prompt the engine refuses (ValueError) must not leave the ones before it running.
            for prompt, params, lora in zip(prompts, params_list, loras or [None] * len(prompts)):
                params = params.clone()
                if isinstance(params, SamplingParams):
                    params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params, lora_request=lora)
                ids.append(request_id)
            bar = _progress_bar(len(ids)) if use_tqdm else None
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
                            _show_speed(bar, output)
        except BaseException:
            engine.abort_request([rid for rid in ids if rid not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
               postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
    bar.pagoda_tokens = [0, 0]
    return bar


def _show_speed(bar: Any, output: Any) -> None:
    bar.pagoda_tokens[0] += len(output.prompt_token_ids or ())
    if isinstance(output, RequestOutput):
        bar.pagoda_tokens[1] += sum(len(o.token_ids) for o in output.outputs)
    elapsed = bar.format_dict.get("elapsed") or 1e-9
    bar.postfix = (f"est. speed input: {bar.pagoda_tokens[0] / elapsed:.2f} toks/s, "
                   f"output: {bar.pagoda_tokens[1] / elapsed:.2f} toks/s")
