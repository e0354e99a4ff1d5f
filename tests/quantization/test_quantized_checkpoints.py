"""Quantized checkpoints written by the real tools, through the whole engine, against transformers.

``tests/fixtures/quant`` holds tiny Llama checkpoints made by gptqmodel, AutoAWQ, compressed-tensors and by
hand (vLLM's FP8 and AQLM, per their formats), each with ``reference/outputs.safetensors``: the logits at every prompt
position and 8 greedy tokens, computed by transformers (or the format's library) loading that checkpoint in
float32 on the CPU — see that folder's README. pagoda loads the same directory with the method its
``quantization_config`` names and must give logits whose cosine with the reference is at least 0.999 at every
position (compared as centred log-probabilities: log-softmax only shifts each row).

8-bit formats must also give the same greedy tokens. Where transformers' own path rounds the dequantized weights
to bf16 (compressed-tensors' decompression) the greedy reference is ``dense_greedy``: the fixture script's dense
float32 model holding the weights dequantized by the format's formula (recorded beside, and checked against,
transformers' logits). W8A8 INT8 quantizes the activations per token, which transformers' reference does not:
its bar is a cosine of 0.998 (measured 0.99896 on this model, whose weights are random).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "quant"
CHECKPOINTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference" / "outputs.safetensors").exists()) \
    if FIXTURES.is_dir() else []
VOCAB = 512
METHOD = {"awq": "awq", "gptq": "gptq", "ct": "compressed-tensors", "fp8": "fp8", "aqlm": "aqlm"}
EIGHT_BIT = ("gptq_8bit", "ct_fp8", "ct_w8a8", "ct_w8a16", "fp8_")
# W8A8 INT8 quantizes each activation row to int8 (scale amax / 127, as vLLM's kernel does), while transformers'
# reference dequantizes only the weights: the rounding of the activations moves the logits (cosine 0.99896 in
# float32, 0.99887 in bf16 on 2026-12-07). compressed-tensors' own fake-quantized forward is no closer (0.99852): it
# scales by amax / 127.5. Greedy tokens equal both references.
COSINE = {"ct_w8a8_int8": 0.998}


def _llm(path, dtype="float32", **kwargs):
    from pagoda import LLM

    return LLM(model=str(path), dtype=dtype, kv_cache_memory_bytes=1 << 24, max_model_len=64, max_logprobs=VOCAB,
               **kwargs)


def _run(llm, input_ids: torch.Tensor, num_tokens: int):
    """Greedy tokens, and the full log-probability rows at every prompt position after the first plus the first
    generated token's (the distributions the reference logits give at positions 0 .. T-1)."""
    from pagoda import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True, logprobs=VOCAB,
                            prompt_logprobs=VOCAB)
    outs = llm.generate([{"prompt_token_ids": ids.tolist()} for ids in input_ids], params)
    tokens, rows = [], []
    for out in outs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        dists = [entry for entry in out.prompt_logprobs[1:]] + [completion.logprobs[0]]
        rows.append(torch.stack([_row(d) for d in dists]))
    return torch.tensor(tokens), torch.stack(rows)


def _row(entry) -> torch.Tensor:
    row = torch.full((VOCAB,), float("-inf"))
    for token, lp in entry.items():
        row[token] = lp.logprob
    return row


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_matches_transformers(name):
    path = FIXTURES / name
    ref = load_file(str(path / "reference" / "outputs.safetensors"))
    llm = _llm(path)
    assert llm.llm_engine.config.model.quantization == METHOD[name.split("_")[0]]
    tokens, logprobs = _run(llm, ref["input_ids"], ref["greedy"].shape[1])
    ref_logprobs = torch.log_softmax(ref["logits"].float(), -1)
    cos = torch.nn.functional.cosine_similarity(_centred(logprobs), _centred(ref_logprobs), dim=-1)
    bar = COSINE.get(name, 0.999)
    assert cos.min() >= bar, f"{name}: logits cosine {cos.min():.5f} < {bar}"
    if name.startswith(EIGHT_BIT):
        expected = ref.get("dense_greedy", ref["greedy"])
        assert torch.equal(tokens, expected), f"{name}: greedy {tokens.tolist()} vs {expected.tolist()}"


def _kernel_kinds(llm) -> set[str]:
    model = llm.llm_engine.runner.model
    kernels = [getattr(k, "inner", k) for m in model.modules() for k in (getattr(m, "quant_kernels", None) or [])]
    # act-order layers wrap theirs; an op's own kernel is named by its op
    return {k.op.op if type(k).__name__ == "OpKernel" else type(k).__name__ for k in kernels}


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if n in ("awq_g32", "gptq_asym_act_g32", "gptq_8bit_g64",
                                                                  "gptq_8bit_asym_g32", "ct_w4a16_asym",
                                                                  "ct_w8a16_asym", "ct_w8a8_int8", "fp8_block",
                                                                  "aqlm_2x8")])
def test_checkpoint_bf16_native_paths(name):
    """bf16 through the kernels this CPU selects: logits within bf16 rounding of transformers' float32 ones (the
    random fixtures' top-1/top-2 margins, 0.01 and up, are below bf16's resolution, so greedy tokens are compared
    in float32 only)."""
    from pagoda.ops import select_ops
    from pagoda.platforms import resolve_platform

    path = FIXTURES / name
    ref = load_file(str(path / "reference" / "outputs.safetensors"))
    llm = _llm(path, dtype="bfloat16")
    ops = select_ops(resolve_platform(), torch.bfloat16)
    if not ops.linear_block_quant.is_reference and name.startswith(("awq", "gptq", "ct_w4a16", "ct_w8a16")):
        # 4- and 8-bit codes, with zero points or without: one op handle per layer
        assert _kernel_kinds(llm) == {"BlockQuantKernel"}, _kernel_kinds(llm)
    _, logprobs = _run(llm, ref["input_ids"], 1)
    ref_logprobs = torch.log_softmax(ref["logits"].float(), -1)
    cos = torch.nn.functional.cosine_similarity(_centred(logprobs), _centred(ref_logprobs), dim=-1)
    bar = COSINE.get(name, 0.999)
    assert cos.min() >= bar, f"{name} bf16: logits cosine {cos.min():.5f} < {bar}"


def _copy(name: str, tmp_path: Path, config_changes: dict | None = None, drop: str | None = None,
          replace: dict | None = None, config_file: str | None = None) -> Path:
    """A copy of a fixture with its quantization config or tensors changed (for the error tests)."""
    target = tmp_path / name
    target.mkdir()
    for file in (FIXTURES / name).iterdir():
        if file.is_file():
            shutil.copy(file, target / file.name)
    config = json.loads((target / "config.json").read_text())
    quant = config["quantization_config"]
    quant.update(config_changes or {})
    if config_file is not None:  # the tool's separate file instead of config.json's entry
        del config["quantization_config"]
        (target / config_file).write_text(json.dumps(quant))
    (target / "config.json").write_text(json.dumps(config))
    if drop or replace:
        tensors = load_file(str(target / "model.safetensors"))
        if drop:
            del tensors[drop]
        tensors.update(replace or {})
        save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.skipif("gptq_sym_g32" not in CHECKPOINTS, reason="fixtures missing")
def test_quantize_config_json_and_requested_method(tmp_path):
    """AutoGPTQ's quantize_config.json is read when config.json has no quantization_config; --quantization must
    agree with the checkpoint."""
    path = _copy("gptq_sym_g32", tmp_path, config_file="quantize_config.json")
    llm = _llm(path, quantization="gptq")
    assert llm.llm_engine.config.model.quantization == "gptq"
    del llm
    with pytest.raises(ValueError, match="gptq-quantized but 'awq' was requested"):
        _llm(path, quantization="awq")


@pytest.mark.skipif("awq_g32" not in CHECKPOINTS, reason="fixture missing")
def test_old_autoawq_quant_config_json_without_a_method(tmp_path):
    """Old AutoAWQ writes quant_config.json with its own key names and no quant_method: the method is inferred from
    the keys and the checkpoint gives the reference's logits; a file whose keys name no method is an error."""
    path = _copy("awq_g32", tmp_path, config_file="quant_config.json")
    (path / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4,
                                                          "version": "GEMM"}))
    ref = load_file(str(FIXTURES / "awq_g32" / "reference" / "outputs.safetensors"))
    llm = _llm(path)
    assert llm.llm_engine.config.model.quantization == "awq"
    _, logprobs = _run(llm, ref["input_ids"], 1)
    cos = torch.nn.functional.cosine_similarity(_centred(logprobs), _centred(torch.log_softmax(ref["logits"], -1)),
                                                dim=-1)
    assert cos.min() >= 0.999
    del llm
    (path / "quant_config.json").write_text(json.dumps({"nbits": 4}))
    with pytest.raises(ValueError, match=r"quant_config.json: can't tell the quantization method"):
        _llm(path)


LAYER = "model.layers.0.self_attn.o_proj"


@pytest.mark.skipif("gptq_sym_g32" not in CHECKPOINTS or "awq_g32" not in CHECKPOINTS, reason="fixtures missing")
@pytest.mark.parametrize("fixture,change,match", [
    ("gptq_sym_g32", {"config_changes": {"bits": 3}},
     r"bits: GPTQ with 3-bit weights is not supported; supported: 4, 8"),
    ("gptq_sym_g32", {"config_changes": {"bits": 2}}, r"2-bit weights is not supported"),
    ("gptq_sym_g32", {"config_changes": {"group_size": 48}}, r"group_size 48 does not divide the input size 128"),
    ("gptq_sym_g32", {"config_changes": {"checkpoint_format": "marlin"}}, r"checkpoint_format: 'marlin'"),
    ("gptq_sym_g32", {"drop": f"{LAYER}.scales"}, rf"lacks weights for: {LAYER}.scales"),
    ("gptq_sym_g32", {"replace": {f"{LAYER}.qweight": torch.zeros(8, 64, dtype=torch.int32)}},
     rf"{LAYER}.qweight: expected shape \(16, 128\)"),
    ("awq_g32", {"config_changes": {"version": "gemv"}}, r"AWQ layout 'gemv' is not supported; supported: gemm"),
    ("awq_g32", {"replace": {f"{LAYER}.scales": torch.zeros(4, 64, dtype=torch.float16)}},
     rf"{LAYER}.scales: expected shape \(4, 128\)"),
])
def test_bad_checkpoints_name_the_layer_and_field(tmp_path, fixture, change, match):
    path = _copy(fixture, tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        _llm(path)


def test_dense_checkpoint_quantized_to_fp8_on_load(tiny_model_dir):
    """``--quantization fp8`` on a dense checkpoint: every linear layer in FP8 with one scale per layer (merged
    q/k/v and gate/up share it, as vLLM quantizes the merged weight), against transformers running the same
    rounded weights."""
    from transformers import AutoModelForCausalLM

    from pagoda import LLM

    path = tiny_model_dir("llama")
    llm = LLM(model=path, dtype="float32", quantization="fp8", skip_tokenizer_init=True, max_model_len=64,
              kv_cache_memory_bytes=1 << 24, max_logprobs=1024)
    assert _kernel_kinds(llm) == {"linear_fp8"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            groups = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                      [layer.self_attn.o_proj], [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]]
            for group in groups:
                scale = max(float(m.weight.abs().max()) for m in group) / 448.0
                for m in group:
                    m.weight.copy_((m.weight / scale).to(torch.float8_e4m3fn).float() * scale)
    ids = torch.tensor([[1, 17, 93, 400, 12, 5, 77, 301], [1, 600, 2, 44, 45, 46, 900, 3]])
    with torch.no_grad():
        ref_logits = model(ids).logits
    tokens, logprobs = _run_vocab(llm, ids, 6, ref_logits.shape[-1])
    cos = torch.nn.functional.cosine_similarity(_centred(logprobs), _centred(torch.log_softmax(ref_logits, -1)), dim=-1)
    assert cos.min() >= 0.9999, f"cosine {cos.min():.6f}"


def _run_vocab(llm, input_ids: torch.Tensor, num_tokens: int, vocab: int):
    global VOCAB
    saved, VOCAB = VOCAB, vocab
    try:
        return _run(llm, input_ids, num_tokens)
    finally:
        VOCAB = saved


def test_platform_supported_quantization_is_enforced(tmp_path):
    """A platform that lists its quantization methods refuses the others at engine set-up, naming both."""
    from pagoda.core.config import _resolve_model_config
    from pagoda.core.engine_args import EngineArgs
    from pagoda.platforms.cpu import CpuPlatform
    from pagoda.plugins.registry import get_registry

    class DenseOnlyPlatform(CpuPlatform):
        name = "dense-only"
        supported_quantization = ("none", "gguf")

    with pytest.raises(ValueError, match=r"quantization gptq can't run on platform dense-only: platform dense-only "
                                         r"supports none, gguf only, not gptq"):
        _resolve_model_config(EngineArgs(model=str(FIXTURES / "gptq_sym_g32")), DenseOnlyPlatform, get_registry())
