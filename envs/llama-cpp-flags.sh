#!/bin/sh
# The cmake flags llama.cpp's tools are built with on this CPU (or the CPU of a cpuinfo file given as $1): each
# x86 instruction set ggml can use, read from /proc/cpuinfo, and never AMX. ggml's AMX matmul crashes (SIGSEGV at the first compute) on
# Sapphire/Granite Rapids-class Xeons, often virtualised (llama.cpp issue 20824); GGML_NATIVE's -march=native
# would turn it on there, so the build names every instruction set itself. The Makefile keys the build folder
# by this output, so two CPUs with different flags never share a build.
set -eu
flags=$(grep -m1 "^flags" "${1:-/proc/cpuinfo}" 2>/dev/null | cut -d: -f2- || true)
has() { for f in "$@"; do case " $flags " in *" $f "*) ;; *) return 1 ;; esac; done; }
on() { if has "$@"; then echo ON; else echo OFF; fi; }
case "$(uname -m)" in
  x86_64|amd64)
    echo "-DGGML_NATIVE=OFF -DGGML_SSE42=$(on sse4_2) -DGGML_AVX=$(on avx) -DGGML_F16C=$(on f16c)" \
         "-DGGML_FMA=$(on fma) -DGGML_BMI2=$(on bmi2) -DGGML_AVX2=$(on avx2) -DGGML_AVX_VNNI=$(on avx_vnni)" \
         "-DGGML_AVX512=$(on avx512f avx512cd avx512vl avx512dq avx512bw) -DGGML_AVX512_VBMI=$(on avx512vbmi)" \
         "-DGGML_AVX512_VNNI=$(on avx512_vnni) -DGGML_AVX512_BF16=$(on avx512_bf16)" \
         "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *) echo "-DGGML_NATIVE=ON" ;;   # other architectures: ggml's own detection (no AMX exists there)
esac
