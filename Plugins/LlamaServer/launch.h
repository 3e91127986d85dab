/*
 * launch.h — how a llama-server child is started: the load request read into
 * a launch configuration, and the command line made from it.
 *
 * Load request fields read here (all optional but model_path):
 *   model_path, max_seq_length (absent or 0: the model's training context from
 *   its GGUF metadata, at most DEFAULT_CONTEXT_CAP), chat_template_override,
 *   cache_type_kv, mmproj_path (default: a projector beside the model that
 *   matches it, see below), n_parallel (4), n_batch (128), n_ubatch (128),
 *   n_threads, embedding (false: true serves /v1/embeddings only, with pooling
 *   "mean" unless `pooling` says), llama_extra_args ([string], an allowlist of
 *   tuning flags, see launch.c), load_timeout_s (600).
 *
 * What a request may not choose: the executable (`llama_server_path` is
 * refused; it is $PATCHBAY_LLAMA_SERVER, then the cached build, then
 * `llama-server` on PATH), nor any flag that reads or writes a file, reaches
 * the network or changes what Patchbay manages.
 *
 * The projector beside a model, when the request names none: in the model's
 * directory, `mmproj-<stem>.gguf` or `<stem>.mmproj.gguf` (stem: the model's
 * file name less `.gguf`); failing that, the one `mmproj*.gguf` there, but only
 * when the directory holds no other GGUF model (split parts of this one
 * aside). Otherwise none: a shared folder never lends one model's projector
 * to another.
 *
 * Why small prompt batches: llama-server notices a closed connection only
 * between prompt batches (and only with `return_progress`, see request.c). At
 * its default (2048/512) a stop during a long prefill takes seconds; at 128 a
 * fraction of one, at no measurable prompt-speed cost on CPU
 * (Benchmarks/llama_server_bench.py measures both).
 */
#ifndef PB_LLAMA_LAUNCH_H
#define PB_LLAMA_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include "json_reader.h"
#include "patchbay.h"

#define DEFAULT_PARALLEL 4
#define DEFAULT_BATCH 128
#define DEFAULT_LOAD_TIMEOUT_S 600
/* The default context: a model's training context can be 128k tokens, whose KV
 * cache alone may not fit in memory; more is a deliberate max_seq_length. */
#define DEFAULT_CONTEXT_CAP 8192

typedef struct launch_config {
    char *server_path;
    char *model_path;
    char *mmproj_path;      /* NULL: text only */
    int unmatched_projectors; /* projectors beside the model that the rule did not give it */
    char *template_path;    /* NULL: the model's own chat template */
    char *cache_type_kv;    /* NULL: llama-server's default (f16) */
    char *pooling;          /* non-NULL: an embedding server with this pooling */
    char *architecture;     /* from the GGUF's metadata; NULL: unknown */
    int64_t training_context; /* from the GGUF's metadata; 0: unknown */
    int64_t context_size;   /* what the child is started with (--ctx-size) */
    int parallel, batch, ubatch, threads;
    char **extra_args;
    size_t extra_count;
    int load_timeout_s;
} launch_config;

/**
 * Reads the load request into `config` (zeroed by the caller); a chat template
 * override is written into `work_dir`. Returns PB_OK, or an error with `error`
 * filled; free `config` with launch_config_free either way.
 */
pb_status launch_parse_request(const json_value *request, const char *work_dir, launch_config *config,
                               char *error, size_t error_size);
void launch_config_free(launch_config *config);

/**
 * The child's command line, serving HTTP on the Unix socket `socket_path` (a
 * path ending in ".sock"; llama-server binds no TCP port then), NULL-terminated.
 * Entries are malloc'd; free with launch_free_argv.
 */
char **launch_build_argv(const launch_config *config, const char *socket_path);
void launch_free_argv(char **argv);

#endif
