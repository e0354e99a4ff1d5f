"""The tokenizers the new families' GGUF metadata describe: Gemma 1/2/3's SentencePiece with byte fallback and no
space prefix, and Phi-3's SentencePiece with a prefix space, against transformers loading the same file
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``). The byte-level BPE vocabularies of GPT-2 and Qwen are
covered by llama.cpp's own vocabularies (test_gguf_tokenizer.py)."""

from __future__ import annotations

import os

import gguf
import pytest

from pagoda.quantization.gguf import GGUFCheckpoint

PIECES = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "\u2581h", "he", "ll", "lo", "\u2581he", "hel", "llo",
          "\u2581hello", "\u2581w", "or", "ld", "\u2581wor", "\u2581world", "\u2581t", "\u2581the", "th", "\n",
          "\u2581\u2581"]
TEXTS = ["hello world", " hello", "hello  world", "héllo wörld", "hello\nworld", "the", "  the  ", "",
         "<start_of_turn>hello<end_of_turn>", "日本"]


def _write_vocab(path: str, arch: str, add_space_prefix: bool) -> str:
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = special + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 262 + [-float(i) for i in range(len(PIECES))])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,add_space_prefix", [("gemma", False), ("gemma2", False), ("gemma3", False),
                                                    ("phi3", True)])
def test_tokenizer_matches_transformers_reading_the_same_file(arch, add_space_prefix, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _write_vocab(str(tmp_path / f"{arch}-vocab.gguf"), arch, add_space_prefix)
    ours = GGUFCheckpoint.load_tokenizer(path)
    folder, name = os.path.dirname(path), os.path.basename(path)
    try:
        theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ValueError:  # no GGUF config reader for Gemma 1: the same tokenizer without the model config
        theirs = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[:1] == [2], "BOS first, as the file's add_bos_token says"
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    # byte fallback: characters outside the vocabulary become their UTF-8 bytes, and decode back
    ids = ours.encode("日本", add_special_tokens=False)
    assert [t for t in ids if t >= 262] == ([] if not add_space_prefix else [262])  # bytes (after Phi-3's "▁")
    assert ours.decode(ids).strip() == "日本"
    assert ours.convert_ids_to_tokens(ours.encode("<start_of_turn>", add_special_tokens=False)) == ["<start_of_turn>"]
    assert ours.eos_token == "<eos>" and ours.bos_token == "<bos>"
