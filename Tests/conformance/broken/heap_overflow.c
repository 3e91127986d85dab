/* Broken on purpose: run_create writes one byte past a heap buffer when a request is not
 * JSON. Harmless-looking without a sanitizer (malloc rounds up), so only a build with
 * -fsanitize=address shows it (Tests/conformance/check_sanitized.sh). Caught by, under
 * AddressSanitizer: error-buffers (the clause that sends such a request). */
#define BROKEN_HEAP_OVERFLOW
#include "../minimal_plugin.c"
