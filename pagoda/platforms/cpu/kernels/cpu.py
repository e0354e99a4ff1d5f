"""pagoda's native CPU kernels: built on first use, cached, called through ctypes.

Why a compiled library: at decode shapes (one query row per sequence, a few hundred cached tokens, weights read
once per token) torch's CPU kernels spend most of their time outside the arithmetic — SDPA needs the paged cache
gathered and padded first, and a bf16 ``linear`` with one input row streams its weights at a fraction of the
memory bandwidth. The kernels here read the paged KV cache in place and stream weights once for all input rows.

The library has no torch headers, so a build takes a couple of seconds; it is compiled for this machine
(``-march=native``) into ``PAGODA_CACHE_ROOT/kernels/<hash>/`` keyed by the source, the flags and the CPU, and
reused after. ``PAGODA_CPU_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from ctypes import c_float, c_int, c_int64, c_void_p
from pathlib import Path

import torch

from pagoda import envs

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "cpu_kernels.cpp", CSRC / "cpu_decode.cpp", CSRC / "cpu_head_api.cpp"]
HEADERS = sorted(CSRC.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ABI_VERSION = 37
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_state: dict[str, object] = {}


class CpuKernels:
    """The loaded library, with argument types declared once (ctypes releases the GIL during each call)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.pagoda_decode_attention.restype = c_int
        lib.pagoda_decode_attention.argtypes = [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int64,
                                                c_void_p, c_int64, c_int64, c_int64, c_int64, c_int64, c_int64,
                                                c_int64, c_float, c_int64, c_float, c_int]
        lib.pagoda_pack_bf16.restype = None
        lib.pagoda_pack_bf16.argtypes = [c_void_p, c_void_p, c_int64, c_int64]
        lib.pagoda_gemm_packed.restype = c_int
        lib.pagoda_gemm_packed.argtypes = [c_int, c_void_p, c_int64, c_void_p, c_void_p, c_void_p, c_int64, c_int64,
                                           c_int64, c_int, c_int]
        lib.pagoda_rms_norm.restype = c_int
        lib.pagoda_rms_norm.argtypes = [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int64, c_int64,
                                        c_float, c_int, c_int]
        lib.pagoda_layer_norm.restype = c_int
        lib.pagoda_layer_norm.argtypes = [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                                          c_int64, c_int64, c_float, c_int]
        self.layer_norm = lib.pagoda_layer_norm
        lib.pagoda_activation.restype = c_int
        lib.pagoda_activation.argtypes = [c_int, c_void_p, c_void_p, c_int64, c_int, c_int]
        self.activation = lib.pagoda_activation
        lib.pagoda_gated_activation.restype = c_int
        lib.pagoda_gated_activation.argtypes = [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int, c_int]
        lib.pagoda_rope.restype = c_int
        lib.pagoda_rope.argtypes = [c_int, c_void_p, c_int64, c_int64, c_int64, c_int64, c_void_p, c_void_p, c_int64,
                                    c_int]
        lib.pagoda_quant_gemm.restype = c_int
        lib.pagoda_quant_gemm.argtypes = [c_int, c_int, c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int,
                                          c_int]
        self.quant_gemm = lib.pagoda_quant_gemm
        lib.pagoda_codebook_gemm.restype = c_int
        lib.pagoda_codebook_gemm.argtypes = [c_int, c_void_p, c_void_p, c_void_p, c_int64, c_int, c_int]
        self.codebook_gemm = lib.pagoda_codebook_gemm
        lib.pagoda_int8_gemm.restype = c_int
        lib.pagoda_int8_gemm.argtypes = [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int64,
                                         c_float, c_int, c_int]
        self.int8_gemm = lib.pagoda_int8_gemm
        lib.pagoda_int8_paths.restype = c_int
        paths = lib.pagoda_int8_paths()
        self.has_amx_int8, self.has_vnni_int8 = bool(paths & 1), bool(paths & 2)
        lib.pagoda_decode_layers.restype = c_int
        lib.pagoda_decode_layers.argtypes = [c_void_p, c_int64, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                                             c_void_p, c_int64, c_void_p, c_void_p, c_void_p, c_void_p, c_int]
        self.decode_layers = lib.pagoda_decode_layers
        lib.pagoda_lora_shrink_expand.restype = c_int
        lib.pagoda_lora_shrink_expand.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_int64, c_void_p, c_int64,
                                                  c_int, c_int]
        self.lora_shrink_expand = lib.pagoda_lora_shrink_expand
        lib.pagoda_linear_argmax.restype = c_int
        lib.pagoda_linear_argmax.argtypes = [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p, c_int,
                                             c_int, c_void_p]
        self.linear_argmax = lib.pagoda_linear_argmax
        lib.pagoda_screened_argmax.restype = c_int
        lib.pagoda_screened_argmax.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_float,
                                               c_int64, c_int64, c_int64, c_void_p, c_int, c_int, c_void_p]
        self.screened_argmax = lib.pagoda_screened_argmax
        lib.pagoda_prefill_attention.restype = c_int
        lib.pagoda_prefill_attention.argtypes = [c_void_p, c_void_p, c_int64, c_void_p, c_void_p, c_void_p, c_int64,
                                                 c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int64, c_int64,
                                                 c_int64, c_int64, c_float, c_int64, c_float, c_int]
        self.prefill_attention = lib.pagoda_prefill_attention
        lib.pagoda_write_kv.restype = None
        lib.pagoda_write_kv.argtypes = [c_void_p, c_void_p, c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_int64,
                                        c_int64, c_int64, c_int64, c_int64, c_int]
        self.write_kv = lib.pagoda_write_kv
        lib.pagoda_fused_moe.restype = c_int
        lib.pagoda_fused_moe.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_void_p,
                                         c_int64, c_int64, c_int64, c_int, c_int, c_void_p, c_void_p]
        self.fused_moe = lib.pagoda_fused_moe
        lib.pagoda_moe_topk.restype = c_int
        lib.pagoda_moe_topk.argtypes = [c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int]
        self.moe_topk = lib.pagoda_moe_topk
        self.rms_norm = lib.pagoda_rms_norm
        self.gated_activation = lib.pagoda_gated_activation
        self.rope = lib.pagoda_rope
        self.decode_attention = lib.pagoda_decode_attention
        self.pack_bf16 = lib.pagoda_pack_bf16
        lib.pagoda_packed_rows.restype = None
        lib.pagoda_packed_rows.argtypes = [c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int]
        self.packed_rows = lib.pagoda_packed_rows
        lib.pagoda_quant_rows.restype = c_int
        lib.pagoda_quant_rows.argtypes = [c_int, c_int, c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int]
        self.quant_rows = lib.pagoda_quant_rows
        self.gemm_packed = lib.pagoda_gemm_packed
        # The packed bf16 GEMM needs AVX512-BF16 at build time (-march=native on a CPU that has it).
        self.has_packed_bf16 = bool(lib.pagoda_has_packed_bf16())
        # The AMX GEMM is built where the compiler targets a CPU with AMX-BF16; it runs only where Linux granted
        # the process the tile state (the caller checks).
        self.has_amx = bool(lib.pagoda_has_amx())


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared between machines never hands out a wrong build."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _find_compiler() -> str | None:
    configured = envs.cxx_compiler()
    if configured:
        return shutil.which(configured) or configured
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(compiler: str) -> Path:
    texts = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*texts, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = Path(envs.cache_root()) / "kernels" / key / "libpagoda_cpu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes each build, the last rename wins, none sees a
    # half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        # One compiler per translation unit, all at once (each takes tens of seconds at -O3), then one link.
        objects = [os.path.join(work, f"{source.stem}.o") for source in SOURCES]
        compile_flags = [flag for flag in FLAGS if flag != "-shared"]
        jobs = [([compiler, *compile_flags, "-c", "-o", obj, str(source)]) for source, obj in zip(SOURCES, objects)]
        _run_all(jobs)
        tmp = os.path.join(work, "libpagoda_cpu.so")
        _run_all([[compiler, *FLAGS, "-o", tmp, *objects]])
        os.replace(tmp, target)
    return target


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands side by side; a RuntimeError with the first failure's command and errors."""
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for cmd in commands]
    failures = []
    for cmd, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"`{' '.join(cmd)}` failed:\n{err.strip()[-2000:]}")
    if failures:
        raise RuntimeError(failures[0])


def kernels() -> CpuKernels | None:
    """The native CPU kernels, or None (with the reason logged once and in :func:`unavailable_reason`)."""
    if "kernels" in _state:
        return _state["kernels"]  # type: ignore[return-value]
    with _lock:
        if "kernels" not in _state:
            _state["kernels"], _state["reason"] = _load()
            if _state["kernels"] is None:
                logger.warning("native CPU kernels unavailable, using torch's ops instead: %s", _state["reason"])
    return _state["kernels"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    kernels()
    return _state.get("reason")  # type: ignore[return-value]


def _load() -> tuple[CpuKernels | None, str | None]:
    if not envs.cpu_kernels_enabled():
        return None, "disabled by PAGODA_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return None, f"no native kernels for {platform.machine()}"
    compiler = _find_compiler()
    if compiler is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
        if lib.pagoda_kernels_abi_version() != ABI_VERSION:
            return None, f"{path} has ABI {lib.pagoda_kernels_abi_version()}, expected {ABI_VERSION}"
        return CpuKernels(lib), None
    except (OSError, RuntimeError) as exc:
        return None, str(exc)


def reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`kernels` call re-reads the environment."""
    with _lock:
        _state.clear()
