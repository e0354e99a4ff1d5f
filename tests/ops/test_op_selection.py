"""Op selection: one implementation per op from the resolved platform, forced lists, errors that say why, and the
CPU's capabilities (AMX only once Linux grants it)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.core.engine_args import EngineArgs
from pagoda.ops import OPS, current_ops, parse_op_impl, reference_ops, select_ops, use_ops
from pagoda.platforms import resolve_platform
from pagoda.platforms.cpu import features

CPU = resolve_platform("cpu")


@pytest.fixture(autouse=True)
def no_forced_env(monkeypatch):
    monkeypatch.delenv("PAGODA_OP_IMPL", raising=False)


def test_every_op_is_chosen_and_every_other_implementation_has_a_reason():
    for dtype in (torch.float32, torch.bfloat16):
        ops = select_ops(CPU, dtype)
        assert set(ops.choices) == set(OPS)
        for choice in ops.choices.values():
            assert choice.chosen in choice.candidates and not choice.forced
            assert {name for name, _ in choice.passed_over} == set(choice.candidates) - {choice.chosen}
            assert all(reason for _, reason in choice.passed_over)


def test_float32_keeps_the_reference_elementwise_ops():
    # float32 must stay bit-compatible with transformers: the native elementwise kernels are bf16 only.
    ops = select_ops(CPU, torch.float32)
    for op in ("rms_norm", "rotary_embedding", "silu_and_mul", "linear_dense"):
        assert ops.choices[op].chosen == "torch", op


def test_parse_op_impl():
    assert parse_op_impl("rms_norm=a|b, linear_dense=c") == {"rms_norm": ["a", "b"], "linear_dense": ["c"]}
    assert parse_op_impl(None) == {} and parse_op_impl(" ") == {}
    for bad in ("rms_norm", "=torch", "rms_norm=", "rms_norm=|"):
        with pytest.raises(ValueError, match="op_impl: .* is not OP=IMPL"):
            parse_op_impl(bad)


def test_forced_lists_errors_and_precedence(monkeypatch):
    ops = select_ops(CPU, torch.bfloat16, "rms_norm=torch")
    assert ops.choices["rms_norm"].chosen == "torch" and ops.choices["rms_norm"].forced
    # A priority list: the first runnable entry wins (cpu_native can't run float32, so torch does).
    ops = select_ops(CPU, torch.float32, "rms_norm=cpu_native|torch")
    assert ops.choices["rms_norm"].chosen == "torch"
    with pytest.raises(ValueError, match=r"op_impl: rms_norm=cpu_native can't run on platform cpu: cpu_native: "
                                         r"computes in bfloat16 only, not float32"):
        select_ops(CPU, torch.float32, "rms_norm=cpu_native")
    with pytest.raises(ValueError, match="op_impl: unknown op.* no_such_op"):
        select_ops(CPU, torch.float32, "no_such_op=torch")
    with pytest.raises(ValueError, match="op_impl: op rms_norm has no implementation 'nope'"):
        select_ops(CPU, torch.float32, "rms_norm=nope")
    monkeypatch.setenv("PAGODA_OP_IMPL", "rms_norm=torch,silu_and_mul=torch")
    ops = select_ops(CPU, torch.bfloat16, "silu_and_mul=cpu_native|torch")
    assert ops.choices["rms_norm"].chosen == "torch"  # from the variable
    assert ops.choices["silu_and_mul"].forced  # the flag's list replaced the variable's for this op


def test_the_engine_flag_is_validated_and_reaches_the_engine(tiny_model_dir):
    with pytest.raises(ValueError, match="op_impl"):
        EngineArgs(op_impl="rms_norm")
    llm = LLM(tiny_model_dir("llama"), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22,
              op_impl="paged_decode_attention=torch")
    assert llm.llm_engine.config.ops.choices["paged_decode_attention"].chosen == "torch"
    assert current_ops().choices["paged_decode_attention"].chosen == "torch"  # outside an engine: the reference


def test_use_ops_is_scoped_to_the_block():
    ops = select_ops(CPU, torch.bfloat16)
    with use_ops(ops):
        assert current_ops() is ops
    assert current_ops() is not ops and all(c.chosen == "torch" for c in reference_ops().choices.values())


def test_a_refused_amx_permission_drops_the_amx_implementations(monkeypatch):
    """Where Linux refuses the tile state, no AMX implementation may be chosen, and the reason says so."""
    monkeypatch.setattr(features, "amx_refusal", lambda: "arch_prctl(ARCH_REQ_XCOMP_PERM) refused: test")
    features.capabilities.cache_clear()
    try:
        assert not any(flag.startswith("amx") for flag in features.capabilities())
        choice = select_ops(CPU, torch.bfloat16).choices["linear_dense"]
        assert choice.chosen != "cpu_amx"
        assert ("cpu_amx", "needs amx_bf16, which platform cpu does not report") in choice.passed_over
    finally:
        features.capabilities.cache_clear()
