#include "json_buffer.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void jb_init(json_buffer *b) { memset(b, 0, sizeof *b); }

void jb_free(json_buffer *b) {
    free(b->data);
    jb_init(b);
}

void jb_clear(json_buffer *b) {
    b->length = 0;
    if (b->data) b->data[0] = 0;
}

static int reserve(json_buffer *b, size_t extra) {
    if (b->failed) return 0;
    if (b->length + extra + 1 <= b->capacity) return 1;
    size_t capacity = b->capacity ? b->capacity : 256;
    while (capacity < b->length + extra + 1) capacity *= 2;
    char *data = realloc(b->data, capacity);
    if (!data) { b->failed = 1; return 0; }
    b->data = data;
    b->capacity = capacity;
    return 1;
}

void jb_append(json_buffer *b, const char *bytes, size_t length) {
    if (!reserve(b, length)) return;
    memcpy(b->data + b->length, bytes, length);
    b->length += length;
    b->data[b->length] = 0;
}

void jb_append_str(json_buffer *b, const char *text) { jb_append(b, text, strlen(text)); }

void jb_printf(json_buffer *b, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(NULL, 0, fmt, args);
    va_end(args);
    if (n < 0 || !reserve(b, (size_t)n)) return;
    va_start(args, fmt);
    vsnprintf(b->data + b->length, (size_t)n + 1, fmt, args);
    va_end(args);
    b->length += (size_t)n;
}

void jb_append_json_string(json_buffer *b, const char *text) {
    if (!text) { jb_append_str(b, "null"); return; }
    jb_append(b, "\"", 1);
    const char *run = text;
    for (const char *s = text; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        jb_append(b, run, (size_t)(s - run));
        run = s + 1;
        switch (c) {
        case '"': jb_append(b, "\\\"", 2); break;
        case '\\': jb_append(b, "\\\\", 2); break;
        case '\n': jb_append(b, "\\n", 2); break;
        case '\r': jb_append(b, "\\r", 2); break;
        case '\t': jb_append(b, "\\t", 2); break;
        default: jb_printf(b, "\\u%04x", c); break;
        }
    }
    jb_append_str(b, run);
    jb_append(b, "\"", 1);
}

static void append_number(json_buffer *b, double number) {
    if (!isfinite(number)) { jb_append_str(b, "null"); return; }
    /* The range test comes first: casting a double outside long long's range is undefined. */
    if (fabs(number) < 9e15 && number == (double)(long long)number) jb_printf(b, "%lld", (long long)number);
    else jb_printf(b, "%.17g", number);
}

void jb_append_json_value(json_buffer *b, const json_value *value) {
    if (!value) { jb_append_str(b, "null"); return; }
    switch (value->kind) {
    case JSON_NULL: jb_append_str(b, "null"); break;
    case JSON_BOOL: jb_append_str(b, value->number != 0 ? "true" : "false"); break;
    case JSON_NUMBER: append_number(b, value->number); break;
    case JSON_STRING: jb_append_json_string(b, value->string); break;
    case JSON_ARRAY:
        jb_append(b, "[", 1);
        for (size_t i = 0; i < value->count; i++) {
            if (i) jb_append(b, ",", 1);
            jb_append_json_value(b, &value->items[i]);
        }
        jb_append(b, "]", 1);
        break;
    case JSON_OBJECT:
        jb_append(b, "{", 1);
        for (size_t i = 0; i < value->count; i++) {
            if (i) jb_append(b, ",", 1);
            jb_append_json_string(b, value->keys[i]);
            jb_append(b, ":", 1);
            jb_append_json_value(b, &value->items[i]);
        }
        jb_append(b, "}", 1);
        break;
    }
}

void jb_key(json_buffer *b, const char *key) {
    if (b->length && b->data[b->length - 1] != '{') jb_append(b, ",", 1);
    jb_append_json_string(b, key);
    jb_append(b, ":", 1);
}
