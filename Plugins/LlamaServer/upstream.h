/*
 * upstream.h — HTTP to one llama-server child, through libcurl.
 *
 * Every request opens its own connection and closes it at the end (no reuse):
 * llama-server frees a slot when its client's connection closes, so closing is
 * how a cancel reaches the engine.
 */
#ifndef PB_LLAMA_UPSTREAM_H
#define PB_LLAMA_UPSTREAM_H

#include <stddef.h>

#include "json_buffer.h"

/** Call once per process, before any other function here. */
int upstream_global_init(void);

/**
 * A blocking request: GET when `body` is NULL, else POST of JSON. The response
 * body goes to `out`. Returns the HTTP status, or 0 when no response came
 * (`error` then says why).
 */
long upstream_request(const char *url, const char *api_key, const char *body, long timeout_ms,
                      json_buffer *out, char *error, size_t error_size);

/** A streaming POST that can be cancelled from any thread. */
typedef struct upstream_stream upstream_stream;

/** Receives the body as it arrives. Return 0 to go on, non-zero to abort the transfer. */
typedef int (*upstream_on_data)(void *context, long http_status, const char *bytes, size_t length);

typedef enum {
    UPSTREAM_COMPLETED,  /* the response ended normally (any HTTP status) */
    UPSTREAM_CANCELLED,  /* upstream_stream_cancel was called; the connection is closed */
    UPSTREAM_ABORTED,    /* on_data asked to stop */
    UPSTREAM_FAILED,     /* no or a broken connection; `error` says why */
} upstream_result;

upstream_stream *upstream_stream_create(void);
/** Sends the POST and delivers the body until the end, a cancel, or an error. At most once per stream. */
upstream_result upstream_stream_run(upstream_stream *stream, const char *url, const char *api_key, const char *body,
                                    upstream_on_data on_data, void *context, long *http_status,
                                    char *error, size_t error_size);
/** Thread-safe, idempotent, non-blocking; effective before and during upstream_stream_run. */
void upstream_stream_cancel(upstream_stream *stream);
int upstream_stream_cancelled(const upstream_stream *stream);
void upstream_stream_destroy(upstream_stream *stream);

#endif
