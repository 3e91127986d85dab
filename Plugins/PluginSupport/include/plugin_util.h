/*
 * plugin_util.h — small helpers every C plugin needs: logging through the host,
 * filling an error buffer, monotonic time.
 */
#ifndef PB_PLUGIN_UTIL_H
#define PB_PLUGIN_UTIL_H

#include <stddef.h>

#include "patchbay.h"

/** A line to the host's log (nothing when `host` is NULL); longer lines are cut at 1 KiB. */
void plugin_log(const pb_host_api *host, pb_log_level level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/** Fills a caller's error buffer, as every ABI call that fails must; a message cut to fit never splits a UTF-8 character. */
void plugin_set_error(char *error, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/** Milliseconds on the monotonic clock. */
double plugin_now_ms(void);
void plugin_sleep_ms(int ms);

#endif
