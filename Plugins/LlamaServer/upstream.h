/*
 * upstream.h — HTTP to one llama-server child, through libcurl.
 *
 * The child listens on a Unix socket (`socket_path`), never on a TCP port:
 * the URL names only the path. Every request opens its own connection and
 * closes it at the end (no reuse): llama-server frees a slot when its client's
 * connection closes, so closing is how a cancel reaches the engine.
 */
#ifndef PB_LLAMA_UPSTREAM_H
#define PB_LLAMA_UPSTREAM_H

#include <stddef.h>
#include <stdint.h>

#include "json_buffer.h"

/** Every URL's start: the host part means nothing, the socket goes through CURLOPT_UNIX_SOCKET_PATH. */
#define UPSTREAM_BASE_URL "http://localhost"

/** Call once per process, before any other function here. */
int upstream_global_init(void);
/** Releases libcurl's global state; call once, after the last request (the plugin's shutdown). */
void upstream_global_cleanup(void);

/** What a reply said besides its status and body, for the error mapping (errors.h). */
typedef struct upstream_reply_info {
    uint32_t retry_after_ms; /* the Retry-After header, in ms; 0 when absent */
    int timed_out;           /* no reply: the transfer ran out of time (not refused, not broken) */
} upstream_reply_info;

/**
 * A blocking request over `socket_path`: GET when `body` is NULL, else POST of JSON. The response
 * body goes to `out`. Returns the HTTP status, or 0 when no response came
 * (`error` then says why). `info` may be NULL.
 */
long upstream_request(const char *socket_path, const char *url, const char *api_key, const char *body, long timeout_ms,
                      json_buffer *out, upstream_reply_info *info, char *error, size_t error_size);

/** A streaming POST that can be cancelled from any thread. */
typedef struct upstream_stream upstream_stream;

/** Receives the body as it arrives. Return 0 to go on, non-zero to abort the transfer. */
typedef int (*upstream_on_data)(void *context, long http_status, const char *bytes, size_t length);
/**
 * Called on the transfer's thread at least every UPSTREAM_TICK_MS while the
 * transfer runs, whether or not bytes arrived. Return 0 to go on, non-zero to
 * abort the transfer (a deadline passed).
 */
typedef int (*upstream_on_tick)(void *context);
#define UPSTREAM_TICK_MS 250

typedef enum {
    UPSTREAM_COMPLETED,  /* the response ended normally (any HTTP status) */
    UPSTREAM_CANCELLED,  /* upstream_stream_cancel was called; the connection is closed */
    UPSTREAM_ABORTED,    /* on_data or on_tick asked to stop; the connection is closed */
    UPSTREAM_TIMED_OUT,  /* the transfer ran out of time (connecting); `error` says why */
    UPSTREAM_FAILED,     /* no or a broken connection; `error` says why */
} upstream_result;

upstream_stream *upstream_stream_create(void);
/**
 * Sends the POST and delivers the body until the end, a cancel, an abort or an
 * error. At most once per stream. `on_tick` may be NULL.
 */
upstream_result upstream_stream_run(upstream_stream *stream, const char *socket_path, const char *url,
                                    const char *api_key, const char *body,
                                    upstream_on_data on_data, upstream_on_tick on_tick, void *context,
                                    long *http_status, char *error, size_t error_size);
/** The reply's Retry-After in ms (0 when absent); valid after upstream_stream_run. */
uint32_t upstream_stream_retry_after_ms(const upstream_stream *stream);
/** Thread-safe, idempotent, non-blocking; effective before and during upstream_stream_run. */
void upstream_stream_cancel(upstream_stream *stream);
int upstream_stream_cancelled(const upstream_stream *stream);
void upstream_stream_destroy(upstream_stream *stream);

#endif
