"""An adapter on a GGUF (block-quantized) base: the delta runs beside the quantized weights in the activations'
dtype; the reference is transformers + peft on the weights transformers dequantizes from the same file."""

from __future__ import annotations

import copy

from gguf.constants import GGMLQuantizationType as T

from pagoda import LLM, SamplingParams
from pagoda.lora.request import LoRARequest
from tests.conftest import assert_all_blocks_free
from tests.lora.conftest import make_peft_adapter, peft_greedy
from tests.quantization.gguf_families import tiny_model, write_gguf

PROMPTS = [[5, 17, 300, 42, 7], [400, 3, 64, 64, 12, 500, 250, 1, 8]]


def test_adapter_on_a_gguf_base_matches_peft_on_the_dequantized_weights(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = tiny_model("qwen2")
    path = write_gguf(str(tmp_path / "qwen2-Q4_K.gguf"), "qwen2", model, T.Q4_K)
    reference = copy.deepcopy(model)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    state = {k: v.float().reshape(reference.state_dict()[k].shape) for k, v in tensors.items()}
    reference.load_state_dict(state, strict=False)
    adapter = make_peft_adapter(reference, str(tmp_path / "adapter"), seed=7, r=8, alpha=16)

    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, max_model_len=128,
              enable_lora=True, max_loras=1)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    lora = LoRARequest("q", 1, adapter)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False,
                           lora_request=[lora, None])
    assert list(outputs[0].outputs[0].token_ids) == peft_greedy(reference, adapter, PROMPTS[:1], 8)[0]
    assert list(outputs[1].outputs[0].token_ids) == peft_greedy(reference, None, PROMPTS[1:], 8)[0]
    assert_all_blocks_free(llm)
