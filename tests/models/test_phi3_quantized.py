"""Phi-3 checkpoints store ``qkv_proj`` and ``gate_up_proj`` fused, also when quantized: the quantized formats'
loaders take a merged layer's tensors whole. Checked on the tiny quantized Llama fixtures (tests/fixtures/quant),
rewritten in Phi-3's layout — a Phi-3 without rope scaling is that Llama with its projections fused — against the
fixtures' transformers references, and against pagoda on the split original (the same kernels, so equal)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.quantization.test_quantized_checkpoints import FIXTURES, _centred, _llm, _run

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# The output axis of each tensor of the 4-bit formats (GPTQ and AWQ keep outputs last; compressed-tensors first).
OUTPUT_AXIS = {"qweight": 1, "qzeros": 1, "scales": 1, "weight_packed": 0, "weight_scale": 0,
               "weight_zero_point": 0}


def fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint with each merged layer's parts concatenated along their outputs, as Phi-3 stores them."""
    out = dict(tensors)
    for name in list(tensors):
        for merged, parts in FUSED.items():
            if f".{parts[0]}." not in name:
                continue
            prefix, kind = name.split(f".{parts[0]}.")
            pieces = [out.pop(f"{prefix}.{part}.{kind}") for part in parts]
            if kind == "g_idx":  # the same input groups for every part
                assert all(torch.equal(p, pieces[0]) for p in pieces)
                fused = pieces[0]
            elif kind == "weight_shape":  # [outputs, inputs]
                fused = torch.stack([sum(p[0] for p in pieces), pieces[0][1]])
            else:
                fused = torch.cat(pieces, dim=OUTPUT_AXIS[kind])
            out[f"{prefix}.{merged}.{kind}"] = fused
    return out


def as_phi3(name: str, target: Path) -> Path:
    target.mkdir()
    for file in (FIXTURES / name).iterdir():
        if file.is_file():
            shutil.copy(file, target / file.name)
    config = json.loads((target / "config.json").read_text())
    config.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
    (target / "config.json").write_text(json.dumps(config))
    tensors = fuse(load_file(str(target / "model.safetensors")))
    assert any(".qkv_proj." in n for n in tensors) and not any(".q_proj." in n for n in tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("name", ["gptq_sym_g32", "awq_g32", "ct_w4a16"])
def test_fused_quantized_phi3_checkpoint(name, tmp_path):
    ref = load_file(str(FIXTURES / name / "reference" / "outputs.safetensors"))
    phi3 = _llm(as_phi3(name, tmp_path / name))
    assert type(phi3.llm_engine.runner.model).__name__ == "Phi3ForCausalLM"
    tokens, logprobs = _run(phi3, ref["input_ids"], 4)
    cos = torch.nn.functional.cosine_similarity(_centred(logprobs),
                                                _centred(torch.log_softmax(ref["logits"].float(), -1)), dim=-1)
    assert cos.min() >= 0.999, f"{name} as Phi-3: logits cosine {cos.min():.5f} < 0.999"
    split_tokens, split_logprobs = _run(_llm(FIXTURES / name), ref["input_ids"], 4)
    assert torch.equal(tokens, split_tokens)
    torch.testing.assert_close(logprobs, split_logprobs, rtol=0, atol=1e-5)
