"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's extra endpoints)."""

from __future__ import annotations

from typing import Any

from pagoda.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                                                TokenizeResponse)
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_engine import APIError


class OpenAIServingTokenization(OpenAIServingChat):
    """Tokenizes a prompt, or a conversation through the chat template, exactly as generation would."""

    async def tokenize(self, request: Any) -> TokenizeResponse:
        self.check_model(request.model)
        tokenizer = self.require_tokenizer()
        if isinstance(request, TokenizeChatRequest):
            _, ids = await self.render_prompt(request)
        else:
            ids = await self.encode(request.prompt, request.add_special_tokens)
        token_strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=token_strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        tokenizer = self.require_tokenizer()
        self.check_token_ids(request.tokens, "tokens")
        try:
            return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))
        except Exception as exc:  # noqa: BLE001 - a tokenizer's own complaint about the ids
            raise APIError(f"tokens: {exc}", 400, "tokens") from exc
