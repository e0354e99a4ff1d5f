"""Resident bytes of each quantized checkpoint's linear-layer kernels against the bytes of its quantized tensors.

Usage: ``python docs/plots/quant_memory.py CHECKPOINT_DIR...`` (bf16 models on this machine's chosen ops).
"""

import math
import re
import sys

from safetensors import safe_open

from pagoda import LLM

DTYPE_BYTES = {"I32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1, "I16": 2, "F32": 4, "I64": 8}


def checkpoint_bytes(path: str, layers: set[str]) -> int:
    """Bytes of the checkpoint tensors of ``layers`` (pagoda's merged names), biases aside."""
    total = 0
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        for key in f.keys():
            module = key.rsplit(".", 1)[0]
            module = re.sub(r"\.(q|k|v)_proj$", ".qkv_proj", module)
            module = re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", module)
            if module in layers and not key.endswith(".bias"):
                piece = f.get_slice(key)
                total += math.prod(piece.get_shape()) * DTYPE_BYTES[piece.get_dtype()]
    return total


def measure(path: str) -> dict:
    """The quantized layers' kernels of the checkpoint at ``path`` loaded in bf16: their kinds, resident bytes and
    the checkpoint's bytes for the same layers."""
    llm = LLM(path, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, max_model_len=256)
    model = llm.llm_engine.runner.model
    kernels = {name: getattr(m, "quant_kernels", None) for name, m in model.named_modules()}
    kernels = {name: ks for name, ks in kernels.items() if ks}
    inner = [getattr(k, "inner", k) for ks in kernels.values() for k in ks]
    return {"layers": len(kernels), "resident": sum(k.nbytes() for ks in kernels.values() for k in ks),
            "checkpoint": checkpoint_bytes(path, set(kernels)),
            "kinds": sorted({k.op.op if type(k).__name__ == "OpKernel" else type(k).__name__ for k in inner})}


def main() -> None:
    for path in sys.argv[1:]:
        m = measure(path)
        print(f"{path.rstrip('/').split('/')[-1]}: {m['layers']} layers ({', '.join(m['kinds'])}), resident "
              f"{m['resident'] / 1e6:.2f} MB, checkpoint {m['checkpoint'] / 1e6:.2f} MB, "
              f"ratio {m['resident'] / m['checkpoint']:.3f}")


if __name__ == "__main__":
    main()
