# Shared set-up for scripts/run and scripts/test. Everything cached lives outside the
# repository, under PATCHBAY_CACHE (default ~/.cache/patchbay), so repeat runs are fast.
PATCHBAY_CACHE="${PATCHBAY_CACHE:-$HOME/.cache/patchbay}"
PATCHBAY_VENV="$PATCHBAY_CACHE/venv"

# apt-get installs the Debian packages named, if any.
apt_install() {
    (($#)) || return 0
    echo "==> installing $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

ensure_system_packages() {
    local missing=()
    command -v cc >/dev/null || missing+=(gcc)
    command -v curl >/dev/null || missing+=(curl)
    # The llama-server plugin talks to its children through libcurl.
    [[ -f /usr/include/x86_64-linux-gnu/curl/curl.h || -f /usr/include/aarch64-linux-gnu/curl/curl.h || -f /usr/include/curl/curl.h ]] \
        || missing+=(libcurl4-openssl-dev)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    apt_install "${missing[@]}"
}

ensure_python_env() {
    local stamp="$PATCHBAY_VENV/.requirements"
    local wanted="openai anthropic pytest"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then return; fi
    echo "==> preparing Python test clients in $PATCHBAY_VENV"
    mkdir -p "$PATCHBAY_CACHE"
    python3 -m venv "$PATCHBAY_VENV"
    "$PATCHBAY_VENV/bin/pip" install -q --upgrade pip
    # shellcheck disable=SC2086
    "$PATCHBAY_VENV/bin/pip" install -q $wanted
    echo "$wanted" > "$stamp"
}

# Links every plugin the build produced into one folder for --plugin-dir.
assemble_plugin_dir() {
    local bin_dir="$1" plugin_dir="$2"
    mkdir -p "$plugin_dir"
    for lib in "$bin_dir"/libPatchbay*Plugin.so; do
        ln -sf "$lib" "$plugin_dir/$(basename "$lib")"
    done
}
