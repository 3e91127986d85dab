#!/usr/bin/env bash
# Builds the C template plugin from the ABI header and three files of Patchbay's plugin support
# (plugin_events, plugin_util, json_reader: a .h and a .c each), with any C compiler:
#
#   ./build.sh PATH/TO/patchbay.h OUT_DIR     ->  OUT_DIR/libc_template_plugin.so
#
# The support files are looked for, in order, in $PATCHBAY_PLUGIN_SUPPORT, in support/ beside
# this script (where an author vendors copies of them), and in the Patchbay checkout this
# folder sits in (Plugins/PluginSupport). -fvisibility=hidden keeps every symbol but
# pb_plugin_entry (PB_EXPORT) out of the dynamic symbol table. Rename LIB below when you
# rename the plugin. Environment: CC (default cc), CFLAGS (added after the defaults).
set -euo pipefail
LIB=c_template_plugin
SOURCES=(template_plugin.c)
SUPPORT_FILES=(plugin_events plugin_util json_reader)
[[ $# -eq 2 ]] || { echo "usage: $0 PATH/TO/patchbay.h OUT_DIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
[[ -f "$1" ]] || { echo "error: no header at $1" >&2; exit 2; }
header_dir="$(cd "$(dirname "$1")" && pwd)"
[[ "$(basename "$1")" == patchbay.h ]] || { echo "error: the header must be named patchbay.h (it is included by that name)" >&2; exit 2; }

support=""
for candidate in "${PATCHBAY_PLUGIN_SUPPORT:-}" "$here/support" "$here/../../Plugins/PluginSupport"; do
    if [[ -n "$candidate" && -f "$candidate/plugin_events.c" ]]; then support="$(cd "$candidate" && pwd)"; break; fi
done
[[ -n "$support" ]] || {
    echo "error: no plugin support files: copy ${SUPPORT_FILES[*]} (.h and .c) from Patchbay's" >&2
    echo "       Plugins/PluginSupport into $here/support, or set PATCHBAY_PLUGIN_SUPPORT" >&2
    exit 2
}
mkdir -p "$2"
out="$(cd "$2" && pwd)"
sources=("${SOURCES[@]/#/$here/}")
for name in "${SUPPORT_FILES[@]}"; do sources+=("$support/$name.c"); done

echo "==> ${CC:-cc}: ${sources[*]} -> $out/lib$LIB.so"
# The header's folder comes first, so that this patchbay.h is the one every file includes.
# shellcheck disable=SC2086 # CFLAGS is a list of flags
"${CC:-cc}" -std=gnu11 -O2 -g -Wall -Wextra -shared -fPIC -fvisibility=hidden \
    -I "$header_dir" -I "$support/include" -I "$support" ${CFLAGS:-} \
    "${sources[@]}" -o "$out/lib$LIB.so" -lpthread

# The one symbol a plugin exports; anything more would leak into the host's namespace.
if command -v nm >/dev/null; then
    exported="$(nm -D --defined-only "$out/lib$LIB.so" | awk '{print $3}')"
    [[ "$exported" == "pb_plugin_entry" ]] || { echo "error: lib$LIB.so exports more than pb_plugin_entry:" >&2; echo "$exported" >&2; exit 1; }
fi
echo "==> built $out/lib$LIB.so"
