/*
 * gguf.h — the little the plugin reads from a GGUF file itself: whether it is
 * one (probe), and its architecture (llama-server reports neither).
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

/**
 * The file's general.architecture ("llama", "qwen2", …), malloc'd, or NULL
 * when it is not among the first metadata entries (writers put it first).
 */
char *gguf_architecture(const char *path);

#endif
