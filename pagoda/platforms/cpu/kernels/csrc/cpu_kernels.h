// Kernel templates shared by pagoda's native CPU library (cpu_kernels.cpp: the per-op C API; cpu_decode.cpp: the
// fused decode step; cpu_head_api.cpp, the LM head's, includes only what it needs). Internal linkage: each
// translation unit instantiates what it uses.
#pragma once

#include "cpu_attention.h"
#include "cpu_codebook.h"
#include "cpu_elementwise.h"
#include "cpu_gemm.h"
#include "cpu_gpt_layers.h"
#include "cpu_head.h"
#include "cpu_int8.h"
#include "cpu_moe.h"
#include "cpu_quant_gemm.h"
#include "cpu_quant_layout.h"
#include "cpu_prefill_attention.h"
#include "cpu_lora.h"
