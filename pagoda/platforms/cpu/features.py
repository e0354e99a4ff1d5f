"""What this CPU can do, read once: its ISA flags, and AMX only once the kernel has let the process use it.

Linux keeps AMX's tile state off for a process until the process asks (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); an AMX instruction before that dies with SIGILL. We ask at first use; when the request is
refused (an old kernel, a sandbox) the ``amx_*`` flags are dropped from the capabilities with the reason logged,
so no AMX implementation is chosen.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

logger = logging.getLogger(__name__)

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def amx_refusal() -> str | None:
    """``None`` once the process may use AMX tiles, else why it may not."""
    if "amx_tile" not in cpu_flags():
        return "this CPU has no AMX"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"AMX permission is only requested on x86-64 Linux, not {platform.system()} {platform.machine()}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError) as exc:
        return f"arch_prctl unavailable: {exc}"
    if rc != 0:
        import os

        return f"arch_prctl(ARCH_REQ_XCOMP_PERM) refused: {os.strerror(ctypes.get_errno())}"
    return None


@functools.cache
def capabilities() -> frozenset[str]:
    """The CPU flags op implementations may require, with the AMX flags only where AMX is usable."""
    flags = set(cpu_flags())
    refusal = amx_refusal()
    if refusal is not None and "amx_tile" in flags:
        logger.warning("AMX kernels disabled: %s", refusal)
    if refusal is not None:
        flags -= {f for f in flags if f.startswith("amx")}
    return frozenset(flags)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations up to this come from the heap
_TRIM_THRESHOLD = 1 << 30  # free heap memory kept for reuse before glibc returns it to the OS


@functools.cache
def keep_activation_memory() -> str | None:
    """Serve a step's large activation tensors from the reused heap instead of fresh mappings.

    glibc maps every allocation above its (adaptive) threshold anew and unmaps it on free, so each multi-megabyte
    activation of a prefill step (2048 tokens x 3072 bf16 is 12 MB) is page-faulted in again on every op: ~15 % of a
    prefill step on a Xeon with AMX. Fixing the thresholds keeps them in the heap. Leaves an environment that sets
    glibc's malloc tunables alone. Returns why nothing was changed, or None.
    """
    import os

    if any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return "glibc malloc tunables set in the environment"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "not glibc"
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return "mallopt refused the thresholds"
    return None
