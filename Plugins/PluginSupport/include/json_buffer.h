/*
 * json_buffer.h — a growable byte buffer with JSON writing helpers, the
 * counterpart of json_reader.h for the C plugins.
 */
#ifndef PB_JSON_BUFFER_H
#define PB_JSON_BUFFER_H

#include <stddef.h>

#include "json_reader.h"

typedef struct json_buffer {
    char *data;   /* NUL-terminated while `failed` is 0 */
    size_t length;
    size_t capacity;
    int failed;   /* set when an allocation failed; later appends are ignored */
} json_buffer;

void jb_init(json_buffer *b);
void jb_free(json_buffer *b);
void jb_clear(json_buffer *b);
void jb_append(json_buffer *b, const char *bytes, size_t length);
void jb_append_str(json_buffer *b, const char *text);
void jb_printf(json_buffer *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/** Appends `text` as a quoted, escaped JSON string ("null" when text is NULL). */
void jb_append_json_string(json_buffer *b, const char *text);
/** Appends a parsed value back as JSON. */
void jb_append_json_value(json_buffer *b, const json_value *value);
/** Appends `,"key":` (the comma only when the object already has members). */
void jb_key(json_buffer *b, const char *key);

#endif
