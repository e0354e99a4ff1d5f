"""``pagoda env``: what this installation can run on, and why not where it can't.

Lists the resolved platform, every registered platform with its availability, every attention backend's
``validate`` verdict for that platform, the quantization methods, every plugin entry point (loaded, excluded by
``VLLM_PLUGINS``, or failed, with the error) and the versions of the packages that matter. ``--json`` prints the
same facts as one JSON object, for bug reports and scripts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform as host
import sys
from typing import Any

import torch

from pagoda import envs

PACKAGES = ("pagoda-llm", "torch", "transformers", "tokenizers", "safetensors", "gguf", "pluggy", "numpy", "triton",
            "flash-attn", "flashinfer-python", "xformers", "torch-xla", "intel-extension-for-pytorch", "fastapi",
            "openai")
ENV_VARS = ("VLLM_PLUGINS", "VLLM_ATTENTION_BACKEND", "VLLM_CPU_KVCACHE_SPACE", "PAGODA_CPU_THREADS",
            "PAGODA_CPU_KERNELS", "PAGODA_OP_IMPL", "PAGODA_CACHE_ROOT", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
            "HIP_VISIBLE_DEVICES", "PJRT_DEVICE", "ZE_AFFINITY_MASK", "VLLM_HOST_IP", "VLLM_PORT",
            "VLLM_PP_LAYER_PARTITION", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")
DTYPE_NAMES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="show platforms, attention backends, quantization methods and plugins",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--device", default="auto", help="platform to check backends against (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPE_NAMES),
                        help="dtype for backend checks (default: the platform's preferred dtype)")
    parser.add_argument("--head-size", type=int, default=128, help="head size for backend checks (default: 128)")
    parser.add_argument("--num-heads", type=int, default=32, help="query heads for backend checks (default: 32)")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads for backend checks (default: 8)")
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache block size for backend checks")
    parser.add_argument("--op-impl", default=None,
                        help="op implementations to force, OP=IMPL[|IMPL...],... (as the engine flag)")
    parser.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Every fact ``pagoda env`` reports, as plain data."""
    from pagoda.attention_backends import AttentionConfig, select_attention_backend
    from pagoda.platforms import resolve_platform
    from pagoda.plugins.registry import get_registry

    registry = get_registry()
    facts: dict[str, Any] = {
        "system": {"python": sys.version.split()[0], "os": host.platform(), "cpu_count": os.cpu_count(),
                   "torch_build": {"cuda": torch.version.cuda, "hip": torch.version.hip,
                                   "xpu": getattr(torch.version, "xpu", None)}},
        "packages": {name: _version(name) for name in PACKAGES},
        "env": envs.snapshot(ENV_VARS),
    }
    platforms = []
    for name, cls in sorted(registry.platforms.items()):
        reason = cls.unavailable_reason()
        platforms.append({**cls.describe(), "status": "available" if reason is None else "unavailable",
                          "reason": reason, "plugin": registry.owner_of("platform", name)})
    facts["platforms"] = platforms
    try:
        chosen = resolve_platform(args.device, registry)
        facts["platform"] = chosen.name
    except (ValueError, RuntimeError) as exc:
        chosen = None
        facts["platform"] = None
        facts["platform_error"] = str(exc)

    backends = []
    if chosen is not None:
        dtype = DTYPE_NAMES[args.dtype] or chosen.default_dtype(torch.bfloat16)
        config = AttentionConfig(platform=chosen.name, dtype=dtype, head_size=args.head_size,
                                 num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, block_size=args.block_size)
        facts["attention_config"] = {"platform": chosen.name, "dtype": str(dtype).removeprefix("torch."),
                                     "head_size": args.head_size, "num_heads": args.num_heads,
                                     "num_kv_heads": args.num_kv_heads, "block_size": args.block_size}
        try:
            facts["attention_backend"] = select_attention_backend(chosen, config, registry=registry).name
        except (ValueError, RuntimeError) as exc:
            facts["attention_backend"] = None
            facts["attention_backend_error"] = str(exc)
        for name, cls in sorted(registry.attention_backends.items()):
            reasons = cls.validate(config)
            backends.append({"name": name, "status": "ok" if not reasons else "unusable", "reasons": reasons,
                             "in_platform_list": name in chosen.attention_backends,
                             "plugin": registry.owner_of("attention_backend", name)})
    facts["attention_backends"] = backends

    quant = []
    for name, cls in sorted(registry.quantization_methods.items()):
        reason = cls.reason_unavailable_on(chosen) if chosen is not None else None
        quant.append({"name": name, "status": "ok" if reason is None else "unusable", "reason": reason,
                      "plugin": registry.owner_of("quantization_method", name)})
    facts["quantization_methods"] = quant
    facts["plugins"] = [{"name": p.name, "value": p.value, "distribution": p.distribution, "version": p.version,
                         "status": p.status, "error": p.error, "provides": list(p.provides)} for p in registry.plugins]
    facts["plugin_allow_list"] = envs.plugins_allow_list()
    facts["models"] = sorted(registry.models)
    facts["ops"] = _ops(chosen, DTYPE_NAMES[args.dtype] or (chosen.default_dtype(torch.bfloat16) if chosen else None),
                        args.op_impl, registry)
    return facts


def _ops(platform, dtype, forced: str | None, registry) -> dict[str, Any]:
    """Each op's chosen implementation for ``platform`` and ``dtype``, and why every other one was passed over.
    Probing an implementation is what a first model run does (the CPU kernels are built here if they must be)."""
    from pagoda.ops import select_ops

    if platform is None:
        return {"dtype": None, "choices": [], "error": "no platform"}
    name = str(dtype).removeprefix("torch.")
    try:
        ops = select_ops(platform, dtype, forced, registry)
    except (ValueError, RuntimeError) as exc:
        return {"dtype": name, "choices": [], "error": str(exc)}
    choices = [{"op": c.op, "chosen": c.chosen, "forced": c.forced,
                "passed_over": [{"impl": impl, "reason": why} for impl, why in c.passed_over],
                "plugin": registry.owner_of(f"op:{c.op}", c.chosen)} for c in ops.choices.values()]
    return {"dtype": name, "choices": choices, "error": None}


def format_text(facts: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    sysinfo = facts["system"]
    build = ", ".join(f"{k} {v}" for k, v in sysinfo["torch_build"].items() if v) or "cpu only"
    add(f"Python {sysinfo['python']} on {sysinfo['os']} ({sysinfo['cpu_count']} CPUs); torch build: {build}")
    add("")
    add(f"Platform: {facts['platform'] or 'none'}" + (f"  ({facts['platform_error']})"
                                                       if facts.get("platform_error") else ""))
    for p in facts["platforms"]:
        status = p["status"] if p["reason"] is None else f"{p['status']}: {p['reason']}"
        add(f"  {p['name']:<12} priority {p['priority']:>4}  {status}")
        if p.get("cpu"):
            add(f"  {'':<12} {p['cpu']}; {' '.join(p.get('isa') or []) or 'no AVX-512/AMX'}")
        if p.get("native_kernels"):
            add(f"  {'':<12} native kernels: {p['native_kernels']}")
    add("")
    cfg = facts.get("attention_config")
    if cfg:
        add(f"Attention backend: {facts['attention_backend'] or 'none'}  (checked for {cfg['platform']}, "
            f"{cfg['dtype']}, head size {cfg['head_size']}, {cfg['num_heads']}/{cfg['num_kv_heads']} heads, "
            f"block size {cfg['block_size']})")
        if facts.get("attention_backend_error"):
            add(f"  error: {facts['attention_backend_error']}")
    for b in facts["attention_backends"]:
        mark = "*" if b["name"] == facts.get("attention_backend") else " "
        add(f" {mark}{b['name']:<12} {b['status']}" + (f": {'; '.join(b['reasons'])}" if b["reasons"] else ""))
    add("")
    ops = facts["ops"]
    add(f"Ops (for {ops['dtype']}; force with --op-impl / PAGODA_OP_IMPL):")
    if ops["error"]:
        add(f"  error: {ops['error']}")
    for c in ops["choices"]:
        add(f"  {c['op']:<24} {c['chosen']}" + ("  (forced)" if c["forced"] else ""))
        for other in c["passed_over"]:
            add(f"  {'':<24}   not {other['impl']}: {other['reason']}")
    add("")
    add("Quantization methods:")
    for q in facts["quantization_methods"]:
        add(f"  {q['name']:<12} {q['status']}" + (f": {q['reason']}" if q["reason"] else ""))
    add("")
    allow = facts["plugin_allow_list"]
    add("Plugins" + (f" (VLLM_PLUGINS={','.join(allow)})" if allow is not None else "") + ":")
    for p in facts["plugins"]:
        dist = f"{p['distribution']} {p['version']}" if p["distribution"] else "(no distribution)"
        detail = f": {p['error']}" if p["error"] else (f" -> {', '.join(p['provides'])}" if p["provides"] else "")
        add(f"  {p['name']:<14} {p['status']:<8} {p['value']}  [{dist}]{detail}")
    add("")
    add("Packages:")
    for name, version in facts["packages"].items():
        add(f"  {name:<28} {version or '-'}")
    if facts["env"]:
        add("")
        add("Environment:")
        for name, value in facts["env"].items():
            add(f"  {name}={value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    facts = collect(args)
    print(json.dumps(facts, indent=2) if args.json else format_text(facts))
    return 0
