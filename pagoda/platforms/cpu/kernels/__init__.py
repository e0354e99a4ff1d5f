"""Native kernels that torch does not provide fast enough on a given platform.

``cpu`` holds a small C++ library (``csrc/cpu_kernels.cpp``) built with the machine's compiler on first use and
called through ctypes; callers ask :func:`pagoda.platforms.cpu.kernels.cpu.kernels` for it and keep torch's ops
when it is unavailable (the reason is logged once).
"""
