/*
 * json_reader.h — a small read-only JSON parser for the C plugins: enough to
 * read the host's requests and an engine's replies. A plugin in another
 * language would use that language's JSON library.
 */
#ifndef PB_JSON_READER_H
#define PB_JSON_READER_H

#include <stddef.h>
#include <stdint.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_kind;

typedef struct json_value {
    json_kind kind;
    double number;            /* JSON_NUMBER, JSON_BOOL (0/1) */
    char *string;             /* JSON_STRING: decoded UTF-8, NUL-terminated */
    size_t count;             /* JSON_ARRAY / JSON_OBJECT: number of items */
    struct json_value *items; /* JSON_ARRAY / JSON_OBJECT: the items */
    char **keys;              /* JSON_OBJECT: one key per item */
} json_value;

/** Parses `text`; returns NULL on malformed input. Free with json_free. */
json_value *json_parse(const char *text);
void json_free(json_value *value);

/** The member `key` of an object, or NULL. */
const json_value *json_get(const json_value *object, const char *key);
/** Convenience readers that fall back to `fallback` when absent or of another kind. */
double json_get_number(const json_value *object, const char *key, double fallback);
/**
 * A number as an integer, truncated toward zero and clamped to int64_t's range (a cast
 * of a double outside it is undefined behaviour); `fallback` when absent, of another
 * kind, or NaN.
 */
int64_t json_get_int64(const json_value *object, const char *key, int64_t fallback);
const char *json_get_string(const json_value *object, const char *key);
int json_get_bool(const json_value *object, const char *key, int fallback);

#endif
