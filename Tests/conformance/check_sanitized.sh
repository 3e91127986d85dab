#!/usr/bin/env bash
# Builds a C plugin with a sanitizer and runs `patchbay plugin check` on it.
#
#   Tests/conformance/check_sanitized.sh address|thread|undefined PLUGIN.c [checker options …]
#   e.g. Tests/conformance/check_sanitized.sh address Tests/ScriptedPlugin/reference_plugin.c
#
# The plugin is compiled with -fsanitize=KIND (with Plugins/PluginSupport's sources, as the
# C plugins here are) into a temporary library. The patchbay binary is not sanitized: the
# checker sees the runtime the library needs (libasan.so.8, libtsan.so.2, …) and preloads it
# into its worker processes with LD_PRELOAD. A sanitizer report during a clause fails that
# clause. Time limits are tripled (--time-scale 3): instrumented code is slower.
# Environment: PATCHBAY (the binary; default .build/debug/patchbay), CC (default cc).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
kind="${1:?usage: $0 address|thread|undefined PLUGIN.c [checker options…]}"
source="${2:?usage: $0 address|thread|undefined PLUGIN.c [checker options…]}"
shift 2
patchbay="${PATCHBAY:-$root/.build/debug/patchbay}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
library="$out/lib$(basename "$source" .c)-$kind.so"
"${CC:-cc}" -std=gnu11 -g -O1 -fno-omit-frame-pointer -fsanitize="$kind" -shared -fPIC -fvisibility=hidden \
    -I "$root/Sources/CPatchbayABI/include" -I "$root/Plugins/PluginSupport/include" \
    "$source" "$root"/Plugins/PluginSupport/*.c -o "$library" -lpthread -lm
status=0
"$patchbay" plugin check "$library" --time-scale 3 "$@" || status=$?
exit "$status"
