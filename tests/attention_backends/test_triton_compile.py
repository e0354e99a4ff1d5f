"""The TRITON_ATTN kernels compile for real GPU targets (NVIDIA sm_80 / sm_90, AMD gfx942) ahead of time.

The backend matrix runs the kernels through Triton's interpreter, which is lenient about things the compiler
rejects (types changing across loop iterations, unsupported dot shapes, ...). Compiling needs no GPU, so this
catches those here. It runs in a subprocess because kernels defined under ``TRITON_INTERPRET=1`` can't compile.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed: pip install pagoda-llm[cuda]")

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pagoda.attention_backends import triton_kernels as tk

    backend, arch, warp, dtype, window = sys.argv[1:]
    target = GPUTarget(backend, int(arch) if arch.isdigit() else arch, int(warp))
    ptr = "*" + dtype
    scalars = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_cs", "stride_ch", "stride_bt"]
    # The window setting also switches soft-capping, so both forms of each kernel compile somewhere.
    flags = dict(BLOCK_SIZE=16, HEAD_SIZE=80, BLOCK_D=128, USE_WINDOW=window == "1", SOFT_CAP=window == "1",
                 UPCAST=False,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    kernels = {
        tk._prefill_kernel: (["out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"], ["block_table_ptr",
                             "query_start_loc_ptr", "seq_lens_ptr"], ["sliding_window", "req_offset"],
                             dict(flags, GROUP=4, BLOCK_M=64)),
        tk._decode_kernel: (["out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"], ["block_table_ptr", "seq_lens_ptr"],
                            ["sliding_window"], dict(flags, GROUP=4, BLOCK_G=16)),
    }
    for fn, (data, index, ints, consts) in kernels.items():
        types = {name: ptr for name in data} | {name: "*i32" for name in index}
        types |= {"qk_scale": "fp32", "soft_cap": "fp32"}
        types |= {name: "i32" for name in ints + scalars} | {name: "constexpr" for name in consts}
        order = list(fn.arg_names)
        signature = {name: types[name] for name in order}
        constexprs = {(order.index(name),): value for name, value in consts.items()}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert compiled.asm, fn.__name__
    print("ok")
''')


# Each target with a different dtype and window setting: three compiles of both kernels (about 10 s each here).
@pytest.mark.parametrize("target, dtype, window", [("cuda-80-32", "bf16", "1"), ("cuda-90-32", "fp32", "0"),
                                                   ("hip-gfx942-64", "fp16", "1")])
def test_kernels_compile(target, dtype, window, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile from scratch, not from an earlier run's cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", SCRIPT, *target.split("-"), dtype, window], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
