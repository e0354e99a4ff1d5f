"""A causal LM checkpoint as a pooling model (vLLM's ``task="embed"`` / ``"classify"`` conversion), in float32
against transformers on the same weights: the Llama family and Phi-3 through one generic conversion."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pagoda import LLM
from tests.conftest import _hf_model, assert_all_blocks_free
from tests.models.family_checks import family_prompts
from tests.models.test_phi3 import longrope_config

ATOL = 1e-4  # float32 on both sides
PROMPTS = family_prompts()[:5]  # 1, 5, 17, 40 tokens and a 35-token one


def make_llm(path: str, **kwargs) -> LLM:
    return LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, seed=0, **kwargs)


def hf_last_hidden(path: str, prompt: list[int]) -> torch.Tensor:
    """transformers' final (normed) hidden state of the prompt's last token."""
    model = _hf_model(path, torch.float32)
    with torch.no_grad():
        return model.model(torch.tensor([prompt])).last_hidden_state[0, -1]


def copy_checkpoint(path: str, target, config_changes: dict | None = None, tensors: dict | None = None) -> str:
    shutil.copytree(path, target)
    if config_changes:
        config = json.loads((target / "config.json").read_text())
        config.update(config_changes)
        (target / "config.json").write_text(json.dumps(config))
    if tensors:
        state = load_file(str(target / "model.safetensors"))
        state.update(tensors)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return str(target)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_embed_is_the_normalized_last_hidden_state(tiny_model_dir, kind):
    """Untied (llama, phi3) and tied (qwen2) LM heads; the LM head is dropped, the last token pooled."""
    path = tiny_model_dir("phi3_longrope", longrope_config()) if kind == "phi3" else tiny_model_dir(kind)
    llm = make_llm(path, task="embed")
    model = llm.llm_engine.runner.model
    assert type(model).__name__.endswith("ForEmbedding") and not hasattr(model, "lm_head")
    outs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        want = F.normalize(hf_last_hidden(path, prompt), dim=-1)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=ATOL, rtol=0)
    assert_all_blocks_free(llm)
    with pytest.raises(ValueError, match="loaded for the 'embed' task"):
        llm.classify([PROMPTS[0]])


def test_embed_follows_the_sentence_transformers_config(tiny_model_dir, tmp_path):
    """modules.json naming mean pooling and no Normalize module overrides the last-token, normalized default."""
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "st")
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}, f)
    llm = make_llm(path, task="embed")
    out = llm.embed([{"prompt_token_ids": PROMPTS[2]}], use_tqdm=False)[0]
    model = _hf_model(tiny_model_dir("llama"), torch.float32)
    with torch.no_grad():
        want = model.model(torch.tensor([PROMPTS[2]])).last_hidden_state[0].mean(0)
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=ATOL, rtol=0)


def test_classify_with_a_score_head(tiny_model_dir, tmp_path):
    """A ``score.weight`` beside the causal LM's weights: transformers' ``*ForSequenceClassification`` loaded from
    the same files is the reference (it ignores the LM head, pagoda drops it)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(7)
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "cls", {"num_labels": 3},
                           {"score.weight": torch.randn(3, 64) * 0.3})
    llm = make_llm(path, task="classify")
    outs = llm.classify([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    reference = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            want = torch.softmax(reference(torch.tensor([prompt])).logits[0], -1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), want, atol=ATOL, rtol=0)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_way_softmax_reranker(tiny_model_dir, tmp_path, kind):
    """Qwen3-Reranker style: the score is the LM's two-way softmax P(yes) over the tokens [no, yes] at the last
    position, from one ``yes - no`` row of the (untied or tied) LM head."""
    no, yes = 17, 401
    path = copy_checkpoint(tiny_model_dir(kind), tmp_path / kind,
                           {"classifier_from_token": [no, yes], "method": "from_2_way_softmax"})
    llm = make_llm(path, task="score")
    outs = llm.encode([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    model = _hf_model(tiny_model_dir(kind), torch.float32)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        want = torch.softmax(logits[[no, yes]], -1)[1]
        torch.testing.assert_close(out.outputs.data.reshape(()), want, atol=ATOL, rtol=0)


def test_reranker_tokens_named_by_the_tokenizer(tiny_model_dir, tmp_path):
    """``classifier_from_token`` as vLLM's configs give it (token strings, here with ``is_original_qwen3_reranker``
    implying the two-way softmax), resolved through the model's tokenizer."""
    from transformers import AutoTokenizer

    from tests.entrypoints.openai.conftest import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    no, yes = 260, 873  # two ordinary tokens inside the tiny model's 1024-token vocabulary
    names = tokenizer.convert_ids_to_tokens([no, yes])
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "named",
                           {"classifier_from_token": names, "is_original_qwen3_reranker": True, "num_labels": 2})
    tokenizer.save_pretrained(path)
    out = make_llm(path, task="score").encode([{"prompt_token_ids": PROMPTS[2]}], use_tqdm=False)[0]
    with torch.no_grad():
        logits = _hf_model(tiny_model_dir("llama"), torch.float32)(torch.tensor([PROMPTS[2]])).logits[0, -1]
    torch.testing.assert_close(out.outputs.data.reshape(()), torch.softmax(logits[[no, yes]], -1)[1], atol=ATOL,
                               rtol=0)


def test_no_post_processing_tokens(tiny_model_dir, tmp_path):
    """One label per token: softmax over the LM's logits of those tokens."""
    tokens = [5, 99, 700]
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "npp",
                           {"classifier_from_token": tokens, "method": "no_post_processing"})
    out = make_llm(path, task="classify").classify([{"prompt_token_ids": PROMPTS[3]}], use_tqdm=False)[0]
    with torch.no_grad():
        logits = _hf_model(tiny_model_dir("llama"), torch.float32)(torch.tensor([PROMPTS[3]])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(out.outputs.probs), torch.softmax(logits[tokens], -1), atol=ATOL,
                               rtol=0)


def test_sequence_classification_checkpoint_of_a_causal_family(tmp_path):
    """``Phi3ForSequenceClassification`` (transformers' class, no pagoda class of its own) loads as Phi-3's
    converted classifier."""
    from transformers import Phi3ForSequenceClassification

    from tests.models.test_phi3 import phi3_config

    torch.manual_seed(3)
    reference = Phi3ForSequenceClassification(phi3_config(num_labels=2, partial_rotary_factor=0.5)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    reference.save_pretrained(tmp_path)
    llm = make_llm(str(tmp_path))
    assert llm.llm_engine.model_config.task == "classify"
    outs = llm.classify([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            want = torch.softmax(reference(torch.tensor([prompt])).logits[0], -1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), want, atol=ATOL, rtol=0)


def test_classify_without_a_head_names_what_is_missing(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a classification head: a score.weight tensor .* or "
                                         "classifier_from_token with method"):
        make_llm(tiny_model_dir("llama"), task="classify")
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "bad", {"classifier_from_token": [1, 2]})
    with pytest.raises(ValueError, match="needs both classifier_from_token and method"):
        make_llm(path, task="classify")
    path = copy_checkpoint(tiny_model_dir("llama"), tmp_path / "bad2",
                           {"classifier_from_token": [1, 2], "method": "softmax_of_everything"})
    with pytest.raises(ValueError, match="method 'softmax_of_everything' is not supported; supported: "
                                         "from_2_way_softmax, no_post_processing"):
        make_llm(path, task="classify")
