"""The GGUF reader and format detection: agreement with gguf.GGUFReader, and clear errors for bad files."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as T

from pagoda.quantization.gguf import GGUFCheckpoint, GGUFError
from pagoda.quantization.gguf.reader import open_gguf

LLAMA_META = {"llama.block_count": 1, "llama.embedding_length": 256, "llama.feed_forward_length": 512,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 128}


def test_reader_agrees_with_gguf_package(tiny_gguf):
    ours = open_gguf(tiny_gguf)
    ref = GGUFReader(tiny_gguf)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        expected = field.contents()
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, np.asarray(expected))
        elif isinstance(value, float):
            assert value == pytest.approx(expected, rel=1e-7), key
        else:
            assert value == expected, key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.ggml_type, info.offset, info.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes)
        assert info.shape == tuple(reversed(t.shape.tolist()))
        np.testing.assert_array_equal(ours.tensor_bytes(t.name).numpy().reshape(-1), t.data.view(np.uint8).reshape(-1))


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="GGUF file not found: .*nowhere.gguf"):
        GGUFCheckpoint.load_hf_config(str(tmp_path / "nowhere.gguf"))


def test_bad_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match=r"not a GGUF file: it starts with b'PK\\x03\\x04'"):
        GGUFCheckpoint.load_hf_config(str(path))


def test_short_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(4))
    with pytest.raises(ValueError, match="8 bytes, too short for a GGUF header"):  # GGUFError is a ValueError
        open_gguf(str(path))


def test_truncated_tensor_data_names_the_tensor(tiny_gguf, tmp_path):
    path = tmp_path / "tiny.gguf"
    data = open(tiny_gguf, "rb").read()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"is truncated: tensor '[\w.]+' \(F\d+, shape \[.*\]\) needs bytes"):
        open_gguf(str(path))


def test_truncated_header(tiny_gguf, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(open(tiny_gguf, "rb").read()[:5000])  # cut inside the vocabulary array
    with pytest.raises(GGUFError, match="header is truncated or corrupt") as info:
        open_gguf(str(path))
    assert info.value.__suppress_context__ and info.value.__cause__ is None  # no parser traceback chained


def test_unsupported_tensor_type_names_tensor_type_and_supported(write_gguf):
    path = write_gguf("iq.gguf", "llama", LLAMA_META, {"token_embd.weight": (T.Q8_0, 64, 256),
                                                       "blk.0.attn_q.weight": (T.IQ4_NL, 256, 256)})
    config = GGUFCheckpoint.load_hf_config(path)
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.attn_q.weight' has type IQ4_NL, which is not supported; "
                                        r"supported types: F32, F16, BF16, Q4_0, .*Q6_K"):
        next(GGUFCheckpoint.iter_weights(path, config))


def test_unsupported_architecture(write_gguf):
    path = write_gguf("bloom.gguf", "bloom", {"bloom.block_count": 1}, {"token_embd.weight": (T.F16, 8, 32)})
    with pytest.raises(ValueError, match="general.architecture 'bloom' is not supported; supported: gemma, gemma2, "
                                         "gemma3, gpt2, llama, phi3, qwen2, qwen2moe, qwen3, qwen3moe"):
        GGUFCheckpoint.load_hf_config(path)


def test_detect(tiny_gguf, tmp_path):
    assert GGUFCheckpoint.detect(tiny_gguf) == tiny_gguf
    no_suffix = tmp_path / "weights.bin"
    shutil.copy(tiny_gguf, no_suffix)
    assert GGUFCheckpoint.detect(str(no_suffix)) == str(no_suffix)  # by magic
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tiny_gguf, single / "m.gguf")
    (single / "config.json").write_text("{}")
    assert GGUFCheckpoint.detect(str(single)) == str(single / "m.gguf")
    (single / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="holds 2 GGUF files \\(m.gguf, other.gguf\\)"):
        GGUFCheckpoint.detect(str(single))
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert GGUFCheckpoint.detect(str(hf_dir)) is None
    assert GGUFCheckpoint.detect(str(hf_dir / "model.safetensors")) is None
    assert os.path.isfile(tiny_gguf)  # nothing above touched the package file
