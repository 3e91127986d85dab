/*
 * sse.h — llama-server's streamed reply (server-sent events from
 * /v1/chat/completions or /v1/completions) turned into ABI events.
 *
 * The reader splits the body into `data:` lines as bytes arrive, emits content,
 * reasoning, tool-call, usage and progress events as chunks come, and keeps
 * what the stream said about its end (finish_reason, and the stop_type /
 * stopping_word that request.c asks llama-server to add, see there) so that
 * the run can pick its finish reason once the stream is over.
 */
#ifndef PB_LLAMA_SSE_H
#define PB_LLAMA_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "json_buffer.h"
#include "patchbay.h"

typedef void (*sse_emit_fn)(void *context, pb_event *event);

typedef struct sse_reader {
    int is_completion;
    sse_emit_fn emit;
    void *context;
    json_buffer pending;     /* bytes after the last complete line */

    /* What the stream said so far. */
    int output_started;      /* a content, reasoning or tool-call delta came */
    int has_progress;        /* the last prompt_progress, for heartbeats */
    pb_event progress;
    pb_finish_reason finish; /* from finish_reason; 0 until the last chunk */
    char *stop_type;         /* "eos" | "word" | "limit" | "none", when llama-server reported it */
    char *stopping_word;     /* the stop string that matched ("" unless stop_type is "word") */
    int truncated;           /* the context ran out */
    int64_t tokens_predicted;
    int has_timings;
    pb_event timings;
    int failed;              /* an error chunk came (already emitted as PB_EVENT_ERROR) */
} sse_reader;

void sse_reader_init(sse_reader *reader, int is_completion, sse_emit_fn emit, void *context);
void sse_reader_free(sse_reader *reader);

/** Feeds body bytes. Returns non-zero to stop reading: an error chunk (emitted) or out of memory. */
int sse_reader_feed(sse_reader *reader, const char *bytes, size_t length);

/**
 * The finish reason of a stream that ended normally, and in `*stop_sequence`
 * the matched stop string for PB_FINISH_STOP_SEQUENCE (else NULL; valid until
 * sse_reader_free). `max_tokens` is the request's (<= 0: none) and
 * `time_limited` whether it set t_max_predict_ms: llama-server reports both
 * limits as stop_type "limit", so the token count tells them apart.
 */
pb_finish_reason sse_reader_finish(const sse_reader *reader, int64_t max_tokens, int time_limited,
                                   const char **stop_sequence);

#endif
