/*
 * errors.h — what went wrong upstream, as an ABI status. What a 1.0 host gets
 * in place of a 1.1 status is the shared plugin_status_for_host's (plugin_events.h).
 */
#ifndef PB_LLAMA_ERRORS_H
#define PB_LLAMA_ERRORS_H

#include <stddef.h>
#include <stdint.h>

#include "patchbay.h"

/** How long a client should wait before trying again when the upstream did not say. */
#define DEFAULT_RETRY_AFTER_MS 1000

/**
 * Maps an llama-server error reply ({"error":{code,message,type}}, or a bare
 * body) with HTTP status `http_status` to a status, and fills `message`. For
 * PB_ERR_BUSY and PB_ERR_OVERLOADED, `*retry_after_ms` is the reply's
 * Retry-After (`header_retry_after_ms`, 0 = absent) or DEFAULT_RETRY_AFTER_MS;
 * for any other status it is 0.
 */
pb_status map_upstream_error(long http_status, const char *body, uint32_t header_retry_after_ms,
                             char *message, size_t size, uint32_t *retry_after_ms);

#endif
