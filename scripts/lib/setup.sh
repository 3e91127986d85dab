# Shared set-up for scripts/run and scripts/test. Everything cached lives outside the
# repository, under PATCHBAY_CACHE (default ~/.cache/patchbay), so repeat runs are fast.
PATCHBAY_CACHE="${PATCHBAY_CACHE:-$HOME/.cache/patchbay}"
# The test clients' venv: a stable link to one venv per content of the pinned requirements
# (ensure_python_env), so a changed pin gets a fresh venv and never a half-upgraded one.
PATCHBAY_VENV="$PATCHBAY_CACHE/venv"
PATCHBAY_TEST_REQUIREMENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/Tests/e2e/requirements.txt"

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

# The web page's end-to-end tests (Tests/e2e/test_web_page.py) drive Debian's chromium
# through its chromium-driver with selenium; nothing downloads a browser of its own.
ensure_browser() {
    local missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    apt_install "${missing[@]}"
}

ensure_python_env() {
    # Keyed by the requirements file's content: venv-<hash> holds exactly those pins, and
    # PATCHBAY_VENV links to it. Older venvs stay until removed by hand, so a process
    # still running from one keeps working.
    local key dir
    key="$(sha256sum "$PATCHBAY_TEST_REQUIREMENTS" | cut -c1-12)"
    dir="$PATCHBAY_CACHE/venv-$key"
    if [[ ! -f "$dir/.complete" ]]; then
        echo "==> preparing the Python test clients (pinned in ${PATCHBAY_TEST_REQUIREMENTS#"$PWD/"}) in $dir"
        mkdir -p "$PATCHBAY_CACHE"
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q --upgrade pip
        "$dir/bin/pip" install -q -r "$PATCHBAY_TEST_REQUIREMENTS"
        touch "$dir/.complete"
    fi
    if [[ "$(readlink "$PATCHBAY_VENV" 2>/dev/null)" != "venv-$key" ]]; then
        # A venv from before the pins was a directory here; keep it aside, do not delete it.
        if [[ -d "$PATCHBAY_VENV" && ! -L "$PATCHBAY_VENV" ]]; then
            rm -rf "$PATCHBAY_CACHE/venv-unpinned"
            mv "$PATCHBAY_VENV" "$PATCHBAY_CACHE/venv-unpinned"
        fi
        ln -sfn "venv-$key" "$PATCHBAY_CACHE/venv.new"
        mv -Tf "$PATCHBAY_CACHE/venv.new" "$PATCHBAY_VENV"
    fi
}

# Links every plugin the build produced into one folder for --plugin-dir.
assemble_plugin_dir() {
    local bin_dir="$1" plugin_dir="$2"
    mkdir -p "$plugin_dir"
    for lib in "$bin_dir"/libPatchbay*Plugin.so; do
        ln -sf "$lib" "$plugin_dir/$(basename "$lib")"
    done
}
