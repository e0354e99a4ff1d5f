"""LoRA options of ``pagoda bench throughput``: ``--lora-path`` (vLLM's: one PEFT adapter, the requests spread over
``--max-loras`` adapter ids that all read it) or ``--num-loras N --lora-rank R`` (N random adapters of rank R on
every projection, written for the loaded model's shapes — real or dummy weights alike); the requests are given
the adapters round-robin."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import torch


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-path", default=None,
                        help="a PEFT LoRA adapter directory; requests use it under --max-loras distinct ids")
    parser.add_argument("--num-loras", type=int, default=0,
                        help="random LoRA adapters to generate and spread the requests over (0: no LoRA)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the generated adapters")


def prepare_args(args: argparse.Namespace) -> None:
    """Turn LoRA on in the engine arguments when a LoRA option asks for it."""
    if args.num_loras < 0:
        raise ValueError(f"num_loras: must be >= 0, got {args.num_loras}")
    if args.lora_path or args.num_loras:
        args.enable_lora = True
        if args.num_loras:
            args.max_lora_rank = max(args.max_lora_rank, args.lora_rank)


def lora_requests(llm: Any, args: argparse.Namespace, num_requests: int) -> list[Any] | None:
    """One ``LoRARequest`` per request (round-robin over the adapters), or None without LoRA options."""
    from pagoda.lora.request import LoRARequest

    if args.lora_path:
        adapters = [LoRARequest(f"lora-{i + 1}", i + 1, args.lora_path) for i in range(args.max_loras)]
    elif args.num_loras:
        root = tempfile.mkdtemp(prefix="pagoda-bench-lora-")
        adapters = [LoRARequest(f"lora-{i + 1}", i + 1, write_random_adapter(llm, os.path.join(root, str(i)),
                                                                               args.lora_rank, seed=i))
                    for i in range(args.num_loras)]
    else:
        return None
    for adapter in adapters:
        llm.llm_engine.add_lora(adapter)
    return [adapters[i % len(adapters)] for i in range(num_requests)]


def write_random_adapter(llm: Any, path: str, rank: int, seed: int) -> str:
    """A PEFT directory with a random rank-``rank`` adapter on every projection of the engine's model."""
    from safetensors.torch import save_file

    manager = llm.llm_engine.runner.lora
    originals = {(merged, shard): original for merged, original, shard in manager.model.stacked_params}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, lora in manager.layers.items():
        parent, _, leaf = name.rpartition(".")
        in_size = lora.input_size
        for shard, out_size in enumerate(lora.output_sizes):
            module = f"{parent}.{originals.get((leaf, shard), leaf)}"
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_size, generator=g) / in_size ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_size, rank, generator=g) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    targets = sorted({k.split(".lora_")[0].rpartition(".")[2] for k in tensors})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
                   "bias": "none"}, f)
    return path
