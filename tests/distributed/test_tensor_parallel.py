"""Tensor parallelism: every model family split over 2 ranks gives the single-process engine's greedy tokens in
float32 (through the vocabulary-parallel greedy head and through the gathered logits, whose logprobs agree within
tolerance), with odd vocabularies, replicated KV heads, both MoE splits, stacked-expert checkpoints, an embedding
model and a JSON-schema request, and so does TP 2 × PP 2; the partitions' narrowing adds up to the whole layer;
per-rank KV sizing; the combinations refused at configuration time."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagoda import SamplingParams
from pagoda.distributed.partition import LinearPartition, VocabPartition
from pagoda.distributed.tensor_parallel import allowed_slice
from pagoda.sampling_params import StructuredOutputsParams
from tests.distributed.spmd import EXECUTOR, generate_jobs, run_engines
from tests.entrypoints.openai.conftest import tiny_chat_model_dir  # noqa: F401 - a fixture
from tests.models.checkpoint_variants import randomize_vectors

TP = 2
MAX_TOKENS = 8
LOGPROB_ATOL = 1e-3
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "pet": {"enum": ["cat", "dog", "fish"]}}, "required": ["name", "pet"]}
# Odd vocabularies: the last rank's rows are padded, and its padding must never be sampled.
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1001, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


def _configs():
    from transformers import (Gemma2Config, GPT2Config, LlamaConfig, OPTConfig, Phi3Config, Qwen2MoeConfig,
                              Qwen3Config)

    return {
        "llama": LlamaConfig(**LLAMA, tie_word_embeddings=False),
        # one KV head: each rank keeps the whole (replicated) KV head; a tied head
        "llama_1kv": LlamaConfig(**{**LLAMA, "num_key_value_heads": 1, "vocab_size": 999}, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**{**LLAMA, "vocab_size": 1003}, head_dim=32, attention_bias=True,
                             tie_word_embeddings=False),
        # a dense layer, then a sparse one with a shared expert: top-2 of 6 experts
        "qwen2_moe": Qwen2MoeConfig(**LLAMA, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                    num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
                                    tie_word_embeddings=False),
        "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1001,
                         max_position_embeddings=1024, word_embed_proj_dim=64, do_layer_norm_before=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=1001, n_positions=1024,
                           bos_token_id=1, eos_token_id=2),
        # fused qkv_proj / gate_up_proj in the checkpoint
        "phi3": Phi3Config(**LLAMA, pad_token_id=0, tie_word_embeddings=False),
        # tied head and embedding scale, final-logit and attention soft-capping, a sliding layer
        "gemma2": Gemma2Config(**LLAMA, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                               attn_logit_softcapping=3.0, final_logit_softcapping=5.0, pad_token_id=0),
    }


def _prompts(vocab: int) -> list[dict]:
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab) for _ in range(20)]
    lengths = (1, 6, 17, 30)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in lengths] + \
        [{"prompt_token_ids": shared + [5]}, {"prompt_token_ids": shared}]


def _stacked_experts_copy(source: str, target) -> str:
    """``source`` with its experts stored stacked (transformers' ``mlp.experts.gate_up_proj`` [E, 2I, H] /
    ``down_proj`` [E, H, I] layout) in ``target``."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    per_expert = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    tensors, parts = {}, {}
    for name, tensor in load_file(f"{source}/model.safetensors").items():
        match = per_expert.match(name)
        if match:
            parts.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = tensor
        else:
            tensors[name] = tensor
    for mlp, experts in parts.items():
        count = 1 + max(e for e, _ in experts)
        tensors[f"{mlp}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[(e, "gate_proj")], experts[(e, "up_proj")]]) for e in range(count)])
        tensors[f"{mlp}.experts.down_proj"] = torch.stack([experts[(e, "down_proj")] for e in range(count)])
    target.mkdir(exist_ok=True)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(f"{source}/config.json", target / "config.json")
    return str(target)


def _jobs(tiny_model_dir, chat_dir: str, tmp_path) -> list[dict]:
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    with_logprobs = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False,
                                   logprobs=2)
    jobs = []
    for kind, config in _configs().items():
        path = randomize_vectors(tiny_model_dir(f"tp_{kind}", config))
        runs = [(_prompts(config.vocab_size), greedy), (_prompts(config.vocab_size), with_logprobs)]
        jobs.append({"model": path, "engine": {"skip_tokenizer_init": True}, "runs": runs})
        # the generative layers as an embedding model (last token, normalized); pooling runs in the engine's
        # process, so only where every rank runs its own engine
        if kind == "llama" and EXECUTOR == "external_launcher":
            jobs.append({"model": path, "engine": {"skip_tokenizer_init": True, "task": "embed"},
                         "runs": [(_prompts(config.vocab_size), "embed")]})
        if kind == "qwen2_moe":
            jobs.append({"model": path, "engine": {"skip_tokenizer_init": True, "enable_expert_parallel": True},
                         "runs": runs})
            stacked = _stacked_experts_copy(path, tmp_path / "stacked_moe")
            for expert_parallel in (False, True):
                jobs.append({"model": stacked, "runs": runs[:1],
                             "engine": {"skip_tokenizer_init": True, "enable_expert_parallel": expert_parallel}})
    schema = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    jobs.append({"model": chat_dir, "engine": {"max_model_len": 512},
                 "runs": [(["Record 1:", "Record 2:"], schema)]})
    return jobs


def _name(job: dict) -> str:
    return job["model"].rsplit("/", 1)[-1] + (" (expert parallel)" if job["engine"].get("enable_expert_parallel")
                                              else "")


def test_tensor_parallel_equals_single_process(tiny_model_dir, tiny_chat_model_dir, tmp_path):  # noqa: F811
    import json

    import jsonschema

    jobs = _jobs(tiny_model_dir, tiny_chat_model_dir, tmp_path)
    expected = generate_jobs(jobs, {})
    got = run_engines(jobs, tensor_parallel_size=TP)
    for job, single, split in zip(jobs, expected, got):
        assert split["tensor_parallel_size"] == TP and single["tensor_parallel_size"] == 1
        for run, (want, have) in enumerate(zip(single["runs"], split["runs"])):
            if "embedding" in want[0]:
                torch.testing.assert_close(torch.tensor([r["embedding"] for r in have]),
                                           torch.tensor([r["embedding"] for r in want]), atol=1e-5, rtol=1e-4)
                continue
            assert [r["token_ids"] for r in have] == [r["token_ids"] for r in want], f"{_name(job)}, run {run}"
            for w, h in zip(want, have):
                if w["logprobs"] is not None:
                    diff = (torch.tensor(h["logprobs"]) - torch.tensor(w["logprobs"])).abs().max().item()
                    assert diff <= LOGPROB_ATOL, f"{_name(job)}: logprobs differ by {diff:.2e}"
    for result in got[-1]["runs"][0]:  # the JSON-schema requests, decoded through the greedy head with the bitmask
        jsonschema.validate(json.loads(result["text"]), SCHEMA)


# ---------------------------------------------------------------------- partitions, single process
def _ranks_linear(weight: torch.Tensor, bias: torch.Tensor, make, x: torch.Tensor, shard=None) -> list[torch.Tensor]:
    """Each rank's output of the layer whose partition ``make(rank)`` gives, from the narrowed full tensors."""
    outs = []
    for rank in range(TP):
        part = make(rank)
        w = part.narrow(weight, shard, out_dim=0, in_dim=1)
        b = part.narrow_bias(bias, shard)
        start, size = part.input_slice  # a row-parallel rank sees its slice of the input features
        outs.append(F.linear(x.narrow(-1, start, size), w, b))
    return outs


def test_column_row_and_fused_partitions_add_up_to_the_whole_layer():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    # column: a merged q/k/v with 4 heads of 4 and 2 KV heads, stored fused (Phi-3 / GPT-2 style, shard=None)
    sizes, unit = [16, 8, 8], [4, 4, 4]
    weight, bias = torch.randn(32, 16), torch.randn(32)
    outs = _ranks_linear(weight, bias, lambda r: LinearPartition.column(16, sizes, r, TP, unit, "qkv"), x)
    whole = F.linear(x, weight, bias)
    q, k, v = whole.split(sizes, dim=-1)
    for rank, out in enumerate(outs):
        rq, rk, rv = out.split([8, 4, 4], dim=-1)
        assert torch.equal(rq, q[:, rank * 8:(rank + 1) * 8])
        assert torch.equal(rk, k[:, rank * 4:(rank + 1) * 4]) and torch.equal(rv, v[:, rank * 4:(rank + 1) * 4])
    # column, one shard at a time (checkpoints with separate q/k/v): the same parts
    for rank in range(TP):
        part = LinearPartition.column(16, sizes, rank, TP, unit, "qkv")
        pieces = [part.narrow(w, i, 0, 1) for i, w in enumerate(weight.split(sizes))]
        assert torch.equal(torch.cat(pieces), part.narrow(weight, None, 0, 1))
    # replicated KV heads: one KV head of 4 on 2 ranks, both keep it
    sizes = [16, 4, 4]
    weight, bias = torch.randn(24, 16), torch.randn(24)
    outs = _ranks_linear(weight, bias, lambda r: LinearPartition.column(16, sizes, r, TP, unit, "qkv"), x)
    k_whole = F.linear(x, weight, bias)[:, 16:20]
    for out in outs:
        assert torch.equal(out[:, 8:12], k_whole)
    # row: partial sums plus the bias once
    weight, bias = torch.randn(10, 16), torch.randn(10)
    outs = _ranks_linear(weight, bias, lambda r: LinearPartition.row(16, [10], r, TP, "o_proj"), x)
    assert torch.allclose(sum(outs), F.linear(x, weight, bias), atol=1e-5)


def test_vocab_partition_rows_and_bitmask_slices():
    vocab, dim = 1001, 8
    table = torch.randn(vocab, dim)
    parts = [VocabPartition(vocab, r, TP) for r in range(TP)]
    rows = torch.cat([p.narrow(table)[:p.num_real_rows] for p in parts])
    assert torch.equal(rows, table)
    assert all(p.narrow(table).shape[0] == p.rows for p in parts)
    assert torch.count_nonzero(parts[-1].narrow(table)[parts[-1].num_real_rows:]) == 0  # zero padding
    allowed_tokens = torch.rand(3, vocab) < 0.3
    words = torch.zeros(3, -(-vocab // 32), dtype=torch.int32)
    for t in range(vocab):
        words[:, t // 32] |= allowed_tokens[:, t].int() << (t % 32)
    flags = torch.cat([allowed_slice(words, p)[:, :p.num_real_rows] for p in parts], dim=1)
    assert torch.equal(flags, allowed_tokens)
    assert not allowed_slice(words, parts[-1])[:, parts[-1].num_real_rows:].any()


# ---------------------------------------------------------------------- configuration
def _config(path: str, **args):
    from pagoda.core.config import EngineConfig
    from pagoda.core.engine_args import EngineArgs

    return EngineConfig.from_engine_args(EngineArgs(model=path, dtype="float32", skip_tokenizer_init=True,
                                                    distributed_executor_backend="external_launcher", **args))


def test_each_rank_sizes_its_own_kv_heads(tiny_model_dir):
    from transformers import LlamaConfig

    from pagoda.core.model_runner import ModelRunner

    split = tiny_model_dir("tp_kv_split", LlamaConfig(**LLAMA))
    single, double = _config(split), _config(split, tensor_parallel_size=2)
    assert (double.attention.num_heads, double.attention.num_kv_heads) == (2, 1)
    assert ModelRunner.kv_bytes_per_block(double) * 2 == ModelRunner.kv_bytes_per_block(single)
    replicated = tiny_model_dir("tp_kv_replicated", LlamaConfig(**{**LLAMA, "num_key_value_heads": 1}))
    assert ModelRunner.kv_bytes_per_block(_config(replicated, tensor_parallel_size=2)) == \
        ModelRunner.kv_bytes_per_block(_config(replicated))


def test_unsupported_combinations_are_errors(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig

    path = tiny_model_dir("tp_kv_split", LlamaConfig(**LLAMA))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"):
        _config(path, tensor_parallel_size=3)
    odd_kv = tiny_model_dir("tp_kv_3", LlamaConfig(**{**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 3,
                                                      "hidden_size": 96}))
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must be divisible by tensor_parallel_size \(2\)"):
        _config(odd_kv, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="enable_lora is not supported with tensor_parallel_size 2"):
        _config(path, tensor_parallel_size=2, enable_lora=True)
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                         vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tensor_parallel_size 2: the encoder-only architecture BertModel"):
        _config(str(tmp_path), tensor_parallel_size=2)


def test_tensor_and_pipeline_parallel_together(tiny_model_dir):
    """TP 2 × PP 2 (four ranks): the grid's tensor-parallel rows and pipeline columns give the same tokens."""
    configs = _configs()
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    with_logprobs = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False,
                                   logprobs=2)
    jobs = []
    for kind in ("llama", "gpt2"):  # an untied head; a tied one (the table on the first and the last stage)
        path = randomize_vectors(tiny_model_dir(f"tp_{kind}", configs[kind]))
        prompts = _prompts(configs[kind].vocab_size)
        jobs.append({"model": path, "engine": {"skip_tokenizer_init": True},
                     "runs": [(prompts, greedy), (prompts, with_logprobs)]})
    expected = generate_jobs(jobs, {})
    got = run_engines(jobs, tensor_parallel_size=TP, pipeline_parallel_size=2)
    for job, single, split in zip(jobs, expected, got):
        assert split["tensor_parallel_size"] == TP
        for want, have in zip(single["runs"], split["runs"]):
            assert [r["token_ids"] for r in have] == [r["token_ids"] for r in want], _name(job)
            for w, h in zip(want, have):
                if w["logprobs"] is not None:
                    diff = (torch.tensor(h["logprobs"]) - torch.tensor(w["logprobs"])).abs().max().item()
                    assert diff <= LOGPROB_ATOL, f"{_name(job)}: logprobs differ by {diff:.2e}"
