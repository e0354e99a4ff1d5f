"""The tokenizer a GGUF file describes in its metadata, as a transformers fast tokenizer.

transformers rebuilds it from the ``tokenizer.ggml.*`` keys (byte-level BPE ``gpt2`` vocabularies with their
merges and pre-tokenizer split, SentencePiece ``llama`` vocabularies, control tokens as special tokens); the
conformance tests check the result against llama.cpp's own expected tokenizations. We add what a serving
engine needs on top: the chat template and the special tokens named by id in the metadata.
"""

from __future__ import annotations

import os
from typing import Any

from pagoda.quantization.gguf.reader import GGUFError, open_gguf


def load_gguf_tokenizer(file: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    f = open_gguf(file)  # precise errors for a missing or corrupt file before transformers sees it
    model = f.metadata.get("tokenizer.ggml.model")
    if model is None:
        raise GGUFError(f"{file}: the file carries no tokenizer (metadata key tokenizer.ggml.model is missing)")
    folder, name = os.path.dirname(os.path.abspath(file)), os.path.basename(file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception:  # noqa: BLE001 - AutoTokenizer also parses the model config, which may be unsupported
        # The vocabulary does not depend on the architecture: build the generic fast tokenizer instead.
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
        except ValueError as e:
            raise GGUFError(f"{file}: cannot build the tokenizer (tokenizer.ggml.model = {model!r}, "
                            f"tokenizer.ggml.pre = {f.metadata.get('tokenizer.ggml.pre')!r}): {e}") from None
    _match_llama_cpp(tokenizer, f.metadata)
    template = f.metadata.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    tokens = f.metadata.get("tokenizer.ggml.tokens") or []
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        token_id = f.metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens) and getattr(tokenizer, attr, None) is None:
            setattr(tokenizer, attr, tokens[token_id])
    return tokenizer


# Byte-level vocabularies whose pre-tokenizer llama.cpp runs with ``ignore_merges``: a pre-token that is a whole
# vocabulary entry is taken as is, even where the merges would split it (Llama 3's tokenizer.json says the same).
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral", "dbrx"}


def _match_llama_cpp(tokenizer: Any, metadata: dict[str, Any]) -> None:
    """Align the tokenizer transformers built with llama.cpp's behaviour where the two differ."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    model = metadata.get("tokenizer.ggml.model")
    if model == "llama" and type(backend.pre_tokenizer).__name__ == "Metaspace":
        # SentencePiece as llama.cpp runs it: every space becomes "▁" and, unless the file says otherwise, one
        # "▁" is prepended to the text. Metaspace(prepend_scheme="first") drops the prefix when the text
        # already starts with a space, so " Hello" would lose a token.
        steps = [normalizers.Replace(" ", "\u2581")]
        if metadata.get("tokenizer.ggml.add_space_prefix", True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = None
    if model == "gpt2" and metadata.get("tokenizer.ggml.pre") in _IGNORE_MERGES_PRE:
        backend.model.ignore_merges = True
