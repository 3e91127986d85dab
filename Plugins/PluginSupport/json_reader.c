#include "json_reader.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *at;
    int depth;
} parser;

enum { MAX_DEPTH = 64 };

static int parse_value(parser *p, json_value *out);

static void skip_space(parser *p) {
    while (*p->at == ' ' || *p->at == '\t' || *p->at == '\n' || *p->at == '\r') p->at++;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hex_digit(s[i]);
        if (d < 0) return 0;
        v = v * 16 + (unsigned)d;
    }
    *out = v;
    return 1;
}

static size_t put_utf8(char *dst, unsigned cp) {
    if (cp < 0x80) { dst[0] = (char)cp; return 1; }
    if (cp < 0x800) { dst[0] = (char)(0xC0 | (cp >> 6)); dst[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12)); dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18)); dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decoded text is never longer than the escaped source, so one allocation suffices. */
static char *parse_string(parser *p) {
    if (*p->at != '"') return NULL;
    const char *start = ++p->at;
    const char *end = start;
    while (*end && *end != '"') {
        if (*end == '\\' && end[1]) end++;
        end++;
    }
    if (*end != '"') return NULL;
    char *out = malloc((size_t)(end - start) + 1);
    if (!out) return NULL;
    size_t n = 0;
    const char *s = start;
    while (s < end) {
        if (*s != '\\') { out[n++] = *s++; continue; }
        s++;
        switch (*s) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned cp, low;
            if (s + 5 > end || !read_hex4(s + 1, &cp)) { free(out); return NULL; }
            s += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && s + 7 <= end && s[1] == '\\' && s[2] == 'u' &&
                read_hex4(s + 3, &low) && low >= 0xDC00 && low < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                s += 6;
            }
            n += put_utf8(out + n, cp);
            break;
        }
        default: free(out); return NULL;
        }
        s++;
    }
    out[n] = '\0';
    p->at = end + 1;
    return out;
}

static int parse_container(parser *p, json_value *out, int is_object) {
    char close = is_object ? '}' : ']';
    size_t cap = 0;
    out->kind = is_object ? JSON_OBJECT : JSON_ARRAY;
    p->at++;
    if (++p->depth > MAX_DEPTH) return 0;
    skip_space(p);
    if (*p->at == close) { p->at++; p->depth--; return 1; }
    for (;;) {
        if (out->count == cap) {
            cap = cap ? cap * 2 : 4;
            json_value *items = realloc(out->items, cap * sizeof *items);
            if (!items) return 0;
            out->items = items;
            if (is_object) {
                char **keys = realloc(out->keys, cap * sizeof *keys);
                if (!keys) return 0;
                out->keys = keys;
            }
        }
        json_value *item = &out->items[out->count];
        memset(item, 0, sizeof *item);
        if (is_object) {
            skip_space(p);
            out->keys[out->count] = parse_string(p);
            if (!out->keys[out->count]) return 0;
            skip_space(p);
            if (*p->at != ':') { out->count++; item->kind = JSON_NULL; return 0; }
            p->at++;
        }
        out->count++;
        if (!parse_value(p, item)) return 0;
        skip_space(p);
        if (*p->at == ',') { p->at++; continue; }
        if (*p->at == close) { p->at++; p->depth--; return 1; }
        return 0;
    }
}

static int parse_value(parser *p, json_value *out) {
    skip_space(p);
    switch (*p->at) {
    case '{': return parse_container(p, out, 1);
    case '[': return parse_container(p, out, 0);
    case '"': out->kind = JSON_STRING; return (out->string = parse_string(p)) != NULL;
    case 't': if (strncmp(p->at, "true", 4)) return 0; p->at += 4; out->kind = JSON_BOOL; out->number = 1; return 1;
    case 'f': if (strncmp(p->at, "false", 5)) return 0; p->at += 5; out->kind = JSON_BOOL; return 1;
    case 'n': if (strncmp(p->at, "null", 4)) return 0; p->at += 4; out->kind = JSON_NULL; return 1;
    default: {
        char *end;
        out->kind = JSON_NUMBER;
        out->number = strtod(p->at, &end);
        if (end == p->at) return 0;
        p->at = end;
        return 1;
    }
    }
}

static void free_contents(json_value *v) {
    free(v->string);
    for (size_t i = 0; i < v->count; i++) {
        free_contents(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
}

json_value *json_parse(const char *text) {
    if (!text) return NULL;
    json_value *root = calloc(1, sizeof *root);
    if (!root) return NULL;
    parser p = { text, 0 };
    int ok = parse_value(&p, root);
    skip_space(&p);
    if (!ok || *p.at != '\0') { json_free(root); return NULL; }
    return root;
}

void json_free(json_value *value) {
    if (!value) return;
    free_contents(value);
    free(value);
}

const json_value *json_get(const json_value *object, const char *key) {
    if (!object || object->kind != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < object->count; i++)
        if (strcmp(object->keys[i], key) == 0) return &object->items[i];
    return NULL;
}

double json_get_number(const json_value *object, const char *key, double fallback) {
    const json_value *v = json_get(object, key);
    return v && v->kind == JSON_NUMBER ? v->number : fallback;
}

int64_t json_get_int64(const json_value *object, const char *key, int64_t fallback) {
    const json_value *v = json_get(object, key);
    if (!v || v->kind != JSON_NUMBER || v->number != v->number) return fallback;
    /* 2^63 is exact as a double, and every double inside (-2^63, 2^63) converts. */
    if (v->number >= 9223372036854775808.0) return INT64_MAX;
    if (v->number <= -9223372036854775808.0) return INT64_MIN;
    return (int64_t)v->number;
}

const char *json_get_string(const json_value *object, const char *key) {
    const json_value *v = json_get(object, key);
    return v && v->kind == JSON_STRING ? v->string : NULL;
}

int json_get_bool(const json_value *object, const char *key, int fallback) {
    const json_value *v = json_get(object, key);
    return v && v->kind == JSON_BOOL ? (int)v->number : fallback;
}
