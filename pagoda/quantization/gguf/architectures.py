"""Per-architecture tables: how llama.cpp's converter stored a Hugging Face model in a GGUF file, and back.

Each :class:`Architecture` names the transformers model it stands for, maps the file's tensor names to the
Hugging Face parameter names the models load, and records the converter's transformations that loading undoes:

- ``llama``: Q and K rows interleaved per head for llama.cpp's rope (undone by :func:`unpermute_rows`); with
  experts (``llama.expert_count``), Mixtral: ``ffn_{gate,up,down}_exps`` are the experts' ``w1``/``w3``/``w2``.
- ``gemma``/``gemma2``/``gemma3``: RMSNorm weights stored as ``1 + w`` (HF's Gemma norm multiplies by ``1 + w``).
- ``phi3``: fused ``attn_qkv`` and ``ffn_up`` (gate and up), which are HF's own ``qkv_proj``/``gate_up_proj``.
- ``gpt2``: Conv1D weights transposed to ``[out, in]`` (yielded so; the model's loader takes them as linear
  weights), learned ``position_embd``.
- ``qwen2moe``/``qwen3moe``: experts stacked as 3-D ``ffn_{gate,up,down}_exps`` [experts, out, in], the router
  ``ffn_gate_inp``, and Qwen2-MoE's shared expert (``*_shexp``) with its gate ``ffn_gate_inp_shexp`` stored 1-D.

The config each architecture's metadata describes is built by :mod:`pagoda.quantization.gguf.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Gemma 2/3: a norm after attention and one on each side of the MLP
_SANDWICH_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                   "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_MOE = {"ffn_gate_inp": "mlp.gate"}
# 3-D expert stacks → one HF parameter per expert ({e} is the expert's index)
_EXPERTS = {"ffn_gate_exps": "mlp.experts.{e}.gate_proj", "ffn_up_exps": "mlp.experts.{e}.up_proj",
            "ffn_down_exps": "mlp.experts.{e}.down_proj"}
_SHARED_EXPERT = {"ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                  "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
# Mixtral: a llama file with experts (llama.cpp writes Mixtral as general.architecture llama)
_MIXTRAL_EXPERTS = {"ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
                    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
                    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2"}
_LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Tensors models keep in float even in a quantized checkpoint (vLLM builds these layers without a quantization
# method): they are yielded dequantized. The routers, the shared expert's gate, GPT-2's position table.
DENSE_TENSORS = {"ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd"}


@dataclass(frozen=True)
class Architecture:
    """One ``general.architecture`` value: the transformers model and the tensor name tables."""

    name: str
    model_type: str
    hf_architecture: str
    block: dict[str, str]
    globals: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_GLOBALS))
    layer_prefix: str = "model.layers"
    experts: dict[str, str] = field(default_factory=dict)
    permuted_qk: bool = False  # llama.cpp interleaved Q/K rows per head
    norm_plus_one: bool = False  # llama.cpp stored Gemma's RMSNorm weights as 1 + w
    skipped: frozenset[str] = frozenset({"rope_freqs.weight"})  # tensors with no HF parameter

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF parameter name of a 1-D/2-D tensor (``None`` for names the model has no use for)."""
        stem, _, kind = gguf_name.rpartition(".")
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part in self.block:
                return f"{self.layer_prefix}.{layer}.{self.block[part]}.{kind}"
            return None
        if stem in self.globals:
            return f"{self.globals[stem]}.{kind}"
        return None

    def expert_names(self, gguf_name: str) -> str | None:
        """For a 3-D expert stack, the HF name pattern with ``{e}`` for the expert; else None."""
        stem, _, kind = gguf_name.rpartition(".")
        if not stem.startswith("blk."):
            return None
        _, layer, part = stem.split(".", 2)
        if part in self.experts:
            return f"{self.layer_prefix}.{layer}.{self.experts[part]}.{kind}"
        return None

    def is_norm(self, gguf_name: str) -> bool:
        return gguf_name.rpartition(".")[0].endswith("norm")

    def dense(self, gguf_name: str) -> bool:
        return gguf_name.rpartition(".")[0].rpartition(".")[2] in DENSE_TENSORS

    def unnormalize(self, gguf_name: str, value: torch.Tensor) -> torch.Tensor:
        """A 1-D tensor as the HF model holds it (Gemma's norms without the converter's + 1)."""
        if self.norm_plus_one and self.is_norm(gguf_name):
            return value - 1
        return value


def _arch(name, model_type, hf_architecture, block, **kwargs) -> Architecture:
    return Architecture(name, model_type, hf_architecture, block, **kwargs)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _arch("llama", "llama", "LlamaForCausalLM", {**_ATTENTION, **_MLP, **_NORMS}, permuted_qk=True),
    _arch("qwen2", "qwen2", "Qwen2ForCausalLM", {**_ATTENTION, **_MLP, **_NORMS}),
    _arch("qwen3", "qwen3", "Qwen3ForCausalLM", {**_ATTENTION, **_QK_NORM, **_MLP, **_NORMS}),
    _arch("gemma", "gemma", "GemmaForCausalLM", {**_ATTENTION, **_MLP, **_NORMS}, norm_plus_one=True),
    _arch("gemma2", "gemma2", "Gemma2ForCausalLM", {**_ATTENTION, **_MLP, **_SANDWICH_NORMS}, norm_plus_one=True),
    _arch("gemma3", "gemma3_text", "Gemma3ForCausalLM", {**_ATTENTION, **_QK_NORM, **_MLP, **_SANDWICH_NORMS},
          norm_plus_one=True),
    _arch("phi3", "phi3", "Phi3ForCausalLM",
          {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
           "ffn_down": "mlp.down_proj", **_NORMS},
          # LongRoPE's factors are config values (read by config.py), not parameters
          skipped=frozenset({"rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"})),
    _arch("qwen2moe", "qwen2_moe", "Qwen2MoeForCausalLM", {**_ATTENTION, **_NORMS, **_MOE, **_SHARED_EXPERT},
          experts=_EXPERTS),
    _arch("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM", {**_ATTENTION, **_QK_NORM, **_NORMS, **_MOE},
          experts=_EXPERTS),
    _arch("gpt2", "gpt2", "GPT2LMHeadModel",
          {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
           "attn_norm": "ln_1", "ffn_norm": "ln_2"},
          globals={"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                   "output_norm": "transformer.ln_f", "output": "lm_head"},
          layer_prefix="transformer.h"),
)}


#: llama files with ``llama.expert_count`` > 0
MIXTRAL = _arch("llama", "mixtral", "MixtralForCausalLM",
                {**_ATTENTION, **_NORMS, "ffn_gate_inp": "block_sparse_moe.gate"}, experts=_MIXTRAL_EXPERTS,
                permuted_qk=True)


def unpermute_rows(n_heads: int, rows: int) -> torch.Tensor:
    """Row index undoing llama.cpp's Q/K permutation: ``hf = gguf[index]``.

    The converter stores, per head, the rows of the two rotary halves interleaved (row ``2i+a`` of a head is
    HF row ``a*half + i``), so that its rope pairs adjacent dimensions; HF's rotate-half pairs ``i`` with
    ``i + half``. Rows are whole quantization blocks along the input dimension, so this works on raw bytes.
    """
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(-1)
