#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-quantize and llama-server (the CPU peer of bench/llamacpp.py)
# from the llama.cpp that the llama-cpp-python==0.3.36 sdist vendors: a pinned, source-only copy
# that pip can fetch from the package registry (the machine reaches nothing else).
#
# Outside the repo (default ~/.cache/loraserve/peers/llama.cpp) because it is a peer, not ours, and
# takes ~15 minutes on 2 cores: build once, reuse. Idempotent: exits at once when the binaries exist.
# Never run by CI. Usage: scripts/build_llamacpp.sh [DEST]   (env: JOBS=2, PYTHON=.venv/bin/python)
# LLAMACPP_ISA=avx2 builds a second copy into DEST/build-avx2 with AVX2+FMA and no AVX-512
# (GGML_NATIVE off), the peer of `python -m bench.llamacpp --isa avx2` on any x86 host.
set -euo pipefail

VERSION=0.3.36
DEST=${1:-${LORASERVE_LLAMACPP_DIR:-$HOME/.cache/loraserve/peers/llama.cpp}}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
TARGETS=(llama-bench llama-quantize llama-server)
case "${LLAMACPP_ISA:-native}" in
    native) BUILD=build; ISA_FLAGS=(-DGGML_NATIVE=ON) ;;
    avx2) BUILD=build-avx2
          ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF) ;;
    *) echo "LLAMACPP_ISA must be native or avx2" >&2; exit 2 ;;
esac

built() {
    for t in "${TARGETS[@]}"; do [ -x "$DEST/$BUILD/bin/$t" ] || return 1; done
}
if built; then
    echo "llama.cpp already built in $DEST/$BUILD/bin"
    exit 0
fi

mkdir -p "$DEST"
if [ ! -f "$DEST/CMakeLists.txt" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION"
    tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    # The vendored tree is the whole of llama.cpp (its convert_lora_to_gguf.py and gguf-py too).
    cp -a "$work/llama_cpp_python-$VERSION/vendor/llama.cpp/." "$DEST/"
fi

# cmake/ninja from pip where the system has none (a user install, not the project's venv).
tools=()
command -v cmake >/dev/null || tools+=(cmake)
command -v ninja >/dev/null || tools+=(ninja)
if [ ${#tools[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q "${tools[@]}"
    PATH="$(dirname "$PYTHON"):$PATH"
fi

cd "$DEST"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -B "$BUILD" "${generator[@]}" "${ISA_FLAGS[@]}" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"
built && echo "llama.cpp built in $DEST/$BUILD/bin"
