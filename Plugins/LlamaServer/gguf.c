#define _GNU_SOURCE
#include "gguf.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The GGUF header (ggml/include/gguf.h): "GGUF", u32 version, then (v2+) u64 tensor count,
 * u64 metadata count, then the metadata: key (u64 length + bytes), u32 type, value. All
 * little-endian, which is what the hosts we build for are. */
#define GGUF_MAGIC "GGUF"

int32_t gguf_probe(const char *path, char *detail, size_t detail_size) {
    /* O_NONBLOCK: a FIFO or a device under a .gguf name must not stall the host's caller. */
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK) : -1;
    if (fd < 0) {
        if (detail && detail_size) snprintf(detail, detail_size, "cannot open the file");
        return 0;
    }
    unsigned char header[8];
    ssize_t n = read(fd, header, sizeof header);
    close(fd);
    if (n < 4 || memcmp(header, GGUF_MAGIC, 4) != 0) {
        if (detail && detail_size) snprintf(detail, detail_size, "not a GGUF file (no GGUF magic)");
        return 0;
    }
    if (detail && detail_size) {
        if (n == 8) {
            uint32_t version;
            memcpy(&version, header + 4, 4);
            snprintf(detail, detail_size, "GGUF v%u", version);
        } else {
            snprintf(detail, detail_size, "GGUF");
        }
    }
    return 100;
}

/* ─── Metadata ──────────────────────────────────────────────────────────── */

enum { T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64, T_I64, T_F64 };
#define MAX_ENTRIES_SCANNED 256
#define MAX_STRING 4096
#define MAX_ARRAY_STRINGS (1u << 24)

static int read_exact(FILE *f, void *out, size_t size) { return fread(out, 1, size, f) == size; }

static int read_u32(FILE *f, uint32_t *v) { return read_exact(f, v, 4); }
static int read_u64(FILE *f, uint64_t *v) { return read_exact(f, v, 8); }

static size_t fixed_size(uint32_t type) {
    switch (type) {
    case T_U8: case T_I8: case T_BOOL: return 1;
    case T_U16: case T_I16: return 2;
    case T_U32: case T_I32: case T_F32: return 4;
    case T_U64: case T_I64: case T_F64: return 8;
    default: return 0;
    }
}

/* A string of at most MAX_STRING bytes, malloc'd; NULL when longer or unreadable. */
static char *read_string(FILE *f) {
    uint64_t length;
    if (!read_u64(f, &length) || length > MAX_STRING) return NULL;
    char *s = malloc((size_t)length + 1);
    if (!s) return NULL;
    if (!read_exact(f, s, (size_t)length)) {
        free(s);
        return NULL;
    }
    s[length] = 0;
    return s;
}

static int skip_string(FILE *f) {
    uint64_t length;
    return read_u64(f, &length) && length < (1ull << 40) && fseeko(f, (off_t)length, SEEK_CUR) == 0;
}

/* Skips one value of `type`; arrays of strings (general.languages, say) are walked one by one. */
static int skip_value(FILE *f, uint32_t type) {
    size_t size = fixed_size(type);
    if (size) return fseeko(f, (off_t)size, SEEK_CUR) == 0;
    if (type == T_STRING) return skip_string(f);
    if (type != T_ARRAY) return 0;
    uint32_t element;
    uint64_t count;
    if (!read_u32(f, &element) || !read_u64(f, &count)) return 0;
    if (element == T_STRING) {
        if (count > MAX_ARRAY_STRINGS) return 0;
        for (uint64_t i = 0; i < count; i++)
            if (!skip_string(f)) return 0;
        return 1;
    }
    size = fixed_size(element);
    return size && count < (1ull << 40) / size && fseeko(f, (off_t)(count * size), SEEK_CUR) == 0;
}

/* An integer value of any width; 0 for another type. */
static int64_t read_integer(FILE *f, uint32_t type) {
    unsigned char bytes[8] = {0};
    size_t size = fixed_size(type);
    if (type == T_F32 || type == T_F64 || type == T_BOOL || !size || !read_exact(f, bytes, size)) return 0;
    uint64_t value = 0;
    memcpy(&value, bytes, size); /* little-endian, like the file */
    if (type == T_I8) return (int8_t)value;
    if (type == T_I16) return (int16_t)value;
    if (type == T_I32) return (int32_t)value;
    return value > INT64_MAX ? INT64_MAX : (int64_t)value;
}

/* Whether `key` is "<architecture>.context_length". */
static int is_context_key(const char *key, const char *architecture) {
    size_t n = architecture ? strlen(architecture) : 0;
    return n && strncmp(key, architecture, n) == 0 && strcmp(key + n, ".context_length") == 0;
}

void gguf_read_info(const char *path, gguf_info *info) {
    FILE *f = fopen(path, "rbe");
    if (!f) return;
    char magic[4];
    uint32_t version;
    uint64_t tensors, entries;
    if (read_exact(f, magic, 4) && memcmp(magic, GGUF_MAGIC, 4) == 0 && read_u32(f, &version) && version >= 2 &&
        read_u64(f, &tensors) && read_u64(f, &entries)) {
        for (uint64_t i = 0; i < entries && i < MAX_ENTRIES_SCANNED && !info->context_length; i++) {
            char *key = read_string(f);
            uint32_t type;
            int ok = key && read_u32(f, &type);
            if (ok && !info->architecture && type == T_STRING && strcmp(key, "general.architecture") == 0) {
                info->architecture = read_string(f);
                ok = info->architecture != NULL;
            } else if (ok && is_context_key(key, info->architecture)) {
                info->context_length = read_integer(f, type);
                ok = info->context_length > 0;
            } else if (ok) {
                ok = skip_value(f, type);
            }
            free(key);
            if (!ok) break; /* unreadable: keep what was found */
        }
    }
    fclose(f);
}

void gguf_info_free(gguf_info *info) {
    free(info->architecture);
    info->architecture = NULL;
}
