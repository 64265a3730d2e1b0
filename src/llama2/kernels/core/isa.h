// The primitives of this translation unit's variant (see isa_name.h): includes the one
// simd/ header the -DLLAMA2_ISA_<NAME> macro of the build selects.
#pragma once

#include "isa_name.h"

#if defined(LLAMA2_ISA_AVX512_VNNI)
#include "../simd/avx512.h"
#define LLAMA2_GEMV_AVX512 1
#elif defined(LLAMA2_ISA_AVX_VNNI)
#define LLAMA2_AVX_VNNI 1
#include "../simd/avx2.h"
#elif defined(LLAMA2_ISA_AVX2)
#include "../simd/avx2.h"
#elif defined(LLAMA2_ISA_NEON_DOT)
#define LLAMA2_NEON_DOT 1
#include "../simd/neon.h"
#elif defined(LLAMA2_ISA_NEON)
#include "../simd/neon.h"
#else
#include "../simd/scalar.h"
#endif

#ifndef LLAMA2_GEMV_AVX512
#define LLAMA2_GEMV_AVX512 0
#endif
