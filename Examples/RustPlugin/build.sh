#!/usr/bin/env bash
# Builds the Rust template plugin from the ABI header alone, with cargo (offline: it has no
# dependencies):
#
#   ./build.sh PATH/TO/patchbay.h OUT_DIR     ->  OUT_DIR/lib<crate name>.so
#
# The header is used by build.rs, which checks the #[repr(C)] mirrors in src/abi.rs against
# it. cargo's own files go to OUT_DIR/<crate name>-target (or $CARGO_TARGET_DIR).
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 PATH/TO/patchbay.h OUT_DIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
header="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
[[ -f "$header" ]] || { echo "error: no header at $1" >&2; exit 2; }
mkdir -p "$2"
out="$(cd "$2" && pwd)"
# The library is named after the crate (Cargo.toml's [package] name, '-' read as '_').
crate="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)"
crate="${crate//-/_}"
target="${CARGO_TARGET_DIR:-$out/$crate-target}"

echo "==> cargo build --release: $here -> $out/lib$crate.so"
PATCHBAY_H="$header" cargo build --release --offline --manifest-path "$here/Cargo.toml" --target-dir "$target"
cp "$target/release/lib$crate.so" "$out/lib$crate.so"

# The one symbol a plugin exports. rustc's cdylib exports only #[no_mangle] functions; should
# yours export more (a C library linked in, say), add a linker version script as the Swift
# template does (RUSTFLAGS="-C link-arg=-Wl,--version-script=exports.map").
if command -v nm >/dev/null; then
    exported="$(nm -D --defined-only "$out/lib$crate.so" | awk '{print $3}')"
    [[ "$exported" == "pb_plugin_entry" ]] || { echo "error: lib$crate.so exports more than pb_plugin_entry:" >&2; echo "$exported" >&2; exit 1; }
fi
echo "==> built $out/lib$crate.so"
