"""Per-layer sliding windows and soft-capping as attention configuration: what builders plan for, which backends
say they can't, and which layer types a text config may name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagoda.attention_backends.interface import AttentionConfig
from pagoda.core.config import _layer_sliding_windows
from pagoda.plugins.registry import get_registry

BASE = dict(platform="cpu", dtype=torch.bfloat16, head_size=64, num_heads=4, num_kv_heads=2, block_size=16)


def test_builders_plan_every_layer_window_and_the_model_wide_one():
    assert AttentionConfig(**BASE).windows() == [None]
    assert AttentionConfig(**BASE, sliding_window=8).windows() == [8]
    mixed = AttentionConfig(**BASE, sliding_window=8, layer_windows=(8, None, 8, None))
    assert mixed.windows() == [None, 8]


def test_every_backend_declares_soft_capping_and_names_why_not():
    config = AttentionConfig(**BASE, logits_soft_cap=50.0)
    for name, backend in get_registry().attention_backends.items():
        reasons = backend.validate(config)
        cap_reasons = [r for r in reasons if "soft-capping" in r]
        if backend.supports_logits_soft_cap:
            assert not cap_reasons, name
        else:
            assert cap_reasons and backend.logits_soft_cap_reason in cap_reasons[0], name


def test_layer_windows_follow_layer_types():
    config = SimpleNamespace(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention"])
    assert _layer_sliding_windows(config, 512) == (512, None, 512)
    assert _layer_sliding_windows(config, None) == (None, None, None)
    assert _layer_sliding_windows(SimpleNamespace(num_hidden_layers=2), 64) == (64, 64)


def test_unknown_layer_types_are_an_error_naming_what_is_supported():
    config = SimpleNamespace(num_hidden_layers=2, layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(ValueError, match="'chunked_attention'.*supported: full_attention, sliding_attention"):
        _layer_sliding_windows(config, 8)
