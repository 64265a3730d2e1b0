// The variant of this translation unit, from the -DLLAMA2_ISA_<NAME> macro of the build
// (none: scalar): LLAMA2_SIMD, the simd/ namespace of its primitives, and LLAMA2_ISA_NS,
// the namespace everything in core/ is compiled into (blocks.h's helpers included), so
// that variants built with different instruction sets can be linked into one program (the
// self-test driver) without sharing any inline function.
#pragma once

#if defined(LLAMA2_ISA_AVX512_VNNI)
#define LLAMA2_SIMD simd_avx512_vnni
#define LLAMA2_ISA_NS isa_avx512_vnni
#elif defined(LLAMA2_ISA_AVX_VNNI)
#define LLAMA2_SIMD simd_avx_vnni
#define LLAMA2_ISA_NS isa_avx_vnni
#elif defined(LLAMA2_ISA_AVX2)
#define LLAMA2_SIMD simd_avx2
#define LLAMA2_ISA_NS isa_avx2
#elif defined(LLAMA2_ISA_NEON_DOT)
#define LLAMA2_SIMD simd_neon_dot
#define LLAMA2_ISA_NS isa_neon_dot
#elif defined(LLAMA2_ISA_NEON)
#define LLAMA2_SIMD simd_neon
#define LLAMA2_ISA_NS isa_neon
#else
#define LLAMA2_SIMD simd_scalar
#define LLAMA2_ISA_NS isa_scalar
#endif
