/*
 * request.h — a normalized request (see patchbay.h) translated into the body
 * llama-server's OpenAI-compatible endpoints take.
 */
#ifndef PB_LLAMA_REQUEST_H
#define PB_LLAMA_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "json_reader.h"
#include "patchbay.h"

/**
 * The upstream body for `request` (a chat, or a raw completion when
 * `is_completion`), with image parts that name a byte input inlined as base64
 * `data:` URLs. Returns a malloc'd string, or NULL with `*status` and `error`
 * filled (an image naming an input that is not there: PB_ERR_INVALID_REQUEST).
 */
char *request_build_body(const json_value *request, int is_completion, const pb_byte_input *const *inputs,
                         size_t input_count, pb_status *status, char *error, size_t error_size);

/**
 * The request's max_tokens as llama-server takes it: -1 for none, and at most
 * INT32_MAX (its counters are 32-bit; a client may send up to 2^63 - 1).
 */
int64_t request_max_tokens(const json_value *request);

/** Base64 (RFC 4648, padded) of `size` bytes into `out`, which holds 4 * ((size + 2) / 3) chars; no NUL. */
void request_base64(const unsigned char *bytes, size_t size, char *out);

#endif
