/* Broken on purpose: run_cancel sleeps 2 s before it takes effect (it is [non-blocking]:
 * "returns promptly ... the host may call it from an event loop"). Caught by:
 * cancel-returns-promptly. */
#define BROKEN_BLOCKING_CANCEL
#include "../minimal_plugin.c"
