/* Broken on purpose: error messages are copied without their NUL and cut at error_size
 * ("writes a NUL-terminated, human-readable message into that buffer"). Caught by:
 * error-buffers. */
#define BROKEN_UNTERMINATED_ERROR
#include "../minimal_plugin.c"
