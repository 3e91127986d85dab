#!/usr/bin/env bash
# Builds the Swift template plugin from the ABI header alone, with swiftc:
#
#   ./build.sh PATH/TO/patchbay.h OUT_DIR     ->  OUT_DIR/libswift_template_plugin.so
#
# The header is copied beside module.modulemap into OUT_DIR/swift_template_plugin-build/include,
# which is how Swift imports a C header (`import CPatchbay`). The linker version script
# exports.map keeps every symbol but pb_plugin_entry out of the dynamic symbol table.
# Rename LIB below when you rename the plugin (letters, digits and _ only: it is also the
# Swift module name).
set -euo pipefail
LIB=swift_template_plugin
[[ $# -eq 2 ]] || { echo "usage: $0 PATH/TO/patchbay.h OUT_DIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
header="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
[[ -f "$header" ]] || { echo "error: no header at $1" >&2; exit 2; }
mkdir -p "$2"
out="$(cd "$2" && pwd -P)"  # physical: the module cache records its paths
work="$out/$LIB-build"
mkdir -p "$work/include"
cp "$header" "$work/include/patchbay.h"
cp "$here/module.modulemap" "$work/include/module.modulemap"

echo "==> swiftc: $here/*.swift -> $out/lib$LIB.so"
# -O: an optimized build. -parse-as-library: no top-level code, no main. The Swift runtime
# libraries are found through the rpath swiftc records (the toolchain's lib/swift/linux),
# the same ones the Patchbay host itself uses.
swiftc -emit-library -parse-as-library -O -swift-version 6 \
    -module-name "$LIB" -module-cache-path "$work/module-cache" \
    -I "$work/include" "$here"/*.swift \
    -Xlinker --version-script="$here/exports.map" \
    -o "$out/lib$LIB.so"

# The one symbol a plugin exports; anything more would leak into the host's namespace.
if command -v nm >/dev/null; then
    exported="$(nm -D --defined-only "$out/lib$LIB.so" | awk '{print $3}')"
    [[ "$exported" == "pb_plugin_entry" ]] || { echo "error: lib$LIB.so exports more than pb_plugin_entry:" >&2; echo "$exported" >&2; exit 1; }
fi
echo "==> built $out/lib$LIB.so"
