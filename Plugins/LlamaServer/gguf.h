/*
 * gguf.h — the little the plugin reads from a GGUF file itself: whether it is
 * one (probe), its architecture (llama-server reports neither) and its training
 * context (for the default context size, before llama-server runs).
 */
#ifndef PB_LLAMA_GGUF_H
#define PB_LLAMA_GGUF_H

#include <stddef.h>
#include <stdint.h>

/**
 * 100 when the file at `path` starts with the GGUF magic, else 0; `detail`
 * says what was found ("GGUF v3"). Reads the first 8 bytes only.
 */
int32_t gguf_probe(const char *path, char *detail, size_t detail_size);

/** What the plugin reads from a GGUF's metadata. */
typedef struct gguf_info {
    char *architecture;     /* general.architecture ("llama", "qwen2", …), malloc'd; NULL: not found */
    int64_t context_length; /* <architecture>.context_length, the training context; 0: not found */
} gguf_info;

/**
 * Reads `info` (zeroed by the caller) from the file's metadata. Writers put these
 * keys before the tokenizer's, so the scan stops once it has both. Free with
 * gguf_info_free.
 */
void gguf_read_info(const char *path, gguf_info *info);
void gguf_info_free(gguf_info *info);

#endif
