/*
 * patchbay.h — the Patchbay backend plugin ABI.
 *
 * This header is the whole contract between the Patchbay host and a backend
 * plugin. A plugin is a shared library that exports exactly one symbol,
 * `pb_plugin_entry`, and talks to the host only through the two function
 * tables defined here. It can be written in C, C++, Rust or Swift.
 *
 * ─── Versioning ──────────────────────────────────────────────────────────
 * The ABI has a major and a minor version (PB_ABI_VERSION_MAJOR/MINOR).
 *  - Appending a field to the end of a struct or table, a new enum value, or a
 *    new capability bit bumps MINOR. Old plugins keep working on new hosts and
 *    new plugins on old hosts, because every struct and table starts with its
 *    own `struct_size`: a reader only touches fields that lie inside the size
 *    the writer declared, and treats fields past it as zero / NULL.
 *  - Anything else (removing, reordering, retyping a field, changing a
 *    signature or a documented behaviour) bumps MAJOR. The host refuses a
 *    plugin whose major differs from its own, with a message naming the file
 *    and both versions.
 *  - The first three fields of pb_plugin_api and pb_host_api (struct_size,
 *    abi_major, abi_minor) never move, in any version.
 *
 * ─── Memory ───────────────────────────────────────────────────────────────
 * Nothing is freed across the boundary. Strings passed into a call are owned
 * by the caller and valid only for the duration of that call. Strings inside
 * an event are valid only during the event callback; the host copies what it
 * keeps. Error messages are written into a caller-provided buffer.
 *
 * ─── Threads ──────────────────────────────────────────────────────────────
 * The host calls load, unload and run_execute on threads of its own that may
 * block for as long as the work takes (never on an event loop). run_cancel
 * may be called from any thread at any time between run_create and
 * run_destroy, concurrently with run_execute, any number of times.
 *
 * ─── Requests ─────────────────────────────────────────────────────────────
 * Generation requests cross as one normalized JSON object (UTF-8), shaped
 * like an OpenAI chat completion request whatever dialect the client spoke:
 *
 *   "kind":        "chat" | "completion"
 *   "messages":    [{"role": "system"|"user"|"assistant"|"tool",
 *                    "content": string | [{"type":"text","text":…} |
 *                                         {"type":"image_url","image_url":{"url":…}}],
 *                    "reasoning_content"?: string, "tool_calls"?: [OpenAI tool calls],
 *                    "tool_call_id"?: string, "name"?: string}]      (kind "chat")
 *   "prompt":      string                                             (kind "completion")
 *   "max_tokens":  integer, always present (the host applies its default)
 *   "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
 *   "presence_penalty", "frequency_penalty", "seed":  numbers, when set
 *   "stop":        [string], when set
 *   "tools", "tool_choice", "parallel_tool_calls", "response_format": OpenAI shapes
 *   "chat_template_kwargs": object (enable_thinking, reasoning_effort, preserve_thinking)
 *   "max_wall_ms": integer — the generation must end by this wall-clock budget
 *
 * A plugin ignores fields it does not know. Unknown future fields are additive.
 */
#ifndef PATCHBAY_H
#define PATCHBAY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PB_ABI_VERSION_MAJOR 1
#define PB_ABI_VERSION_MINOR 0

/** The one symbol a plugin exports. */
#define PB_PLUGIN_ENTRY_SYMBOL "pb_plugin_entry"

#if defined(_WIN32)
#define PB_EXPORT __declspec(dllexport)
#else
#define PB_EXPORT __attribute__((visibility("default")))
#endif

/* ─── Status codes ──────────────────────────────────────────────────────── */

/** Result of a call, and the code of an error event. Values are fixed. */
typedef int32_t pb_status;
enum {
    PB_OK = 0,
    /** The request is malformed or names something unsupported (host answers 400). */
    PB_ERR_INVALID_REQUEST = 1,
    /** A file or resource does not exist (404). */
    PB_ERR_NOT_FOUND = 2,
    /** The plugin lacks this capability (400). */
    PB_ERR_UNSUPPORTED = 3,
    /** The model could not be loaded (the message says why). */
    PB_ERR_LOAD_FAILED = 4,
    /** The work was cancelled. */
    PB_ERR_CANCELLED = 5,
    /** The prompt does not fit the model's context window (400). */
    PB_ERR_CONTEXT_LENGTH_EXCEEDED = 6,
    /** The engine (a child process, a remote server) was lost (502). */
    PB_ERR_ENGINE_UNAVAILABLE = 7,
    /** Out of memory. */
    PB_ERR_OUT_OF_MEMORY = 8,
    /** Anything else; the message says what. */
    PB_ERR_INTERNAL = 9,
};

/* ─── Capabilities ──────────────────────────────────────────────────────── */

/** Bits in pb_plugin_api.capabilities. */
enum {
    PB_CAP_CHAT = 1u << 0,          /* chat requests (kind "chat") */
    PB_CAP_COMPLETION = 1u << 1,    /* raw prompt completion (kind "completion") */
    PB_CAP_VISION_INPUT = 1u << 2,  /* image parts in messages (when the model has vision) */
    PB_CAP_AUDIO_INPUT = 1u << 3,   /* audio input */
    PB_CAP_EMBEDDINGS = 1u << 4,    /* `embed` is implemented */
    PB_CAP_TOKENIZE = 1u << 5,      /* `count_tokens` is implemented */
    PB_CAP_TOOLS = 1u << 6,         /* tool calls come back as tool-call events */
    PB_CAP_REASONING = 1u << 7,     /* reasoning comes back as reasoning events */
};

/* ─── Opaque handles (owned by the plugin) ─────────────────────────────── */

/** A loaded model. Valid from a successful `load` until `unload`. */
typedef struct pb_model pb_model;
/** One generation. Valid from a successful `run_create` until `run_destroy`. */
typedef struct pb_run pb_run;

/* ─── Events: what a run streams back ──────────────────────────────────── */

typedef int32_t pb_event_type;
enum {
    PB_EVENT_CONTENT_DELTA = 1,    /* text: a piece of the answer */
    PB_EVENT_REASONING_DELTA = 2,  /* text: a piece of the reasoning ("thinking") */
    PB_EVENT_TOOL_CALL_DELTA = 3,  /* tool_index, tool_call_id/tool_name on the first delta of a call, text: arguments piece */
    PB_EVENT_USAGE = 4,            /* prompt_tokens, completion_tokens, cached_tokens */
    PB_EVENT_TIMINGS = 5,          /* prompt_ms, predicted_ms, prompt_per_second, predicted_per_second */
    PB_EVENT_FINISH = 6,           /* TERMINAL. finish_reason */
    PB_EVENT_ERROR = 7,            /* TERMINAL. error_code, text: the message */
};

typedef int32_t pb_finish_reason;
enum {
    PB_FINISH_STOP = 1,            /* natural end or a stop sequence */
    PB_FINISH_LENGTH = 2,          /* max_tokens or the context window was reached */
    PB_FINISH_TOOL_CALLS = 3,      /* the model ended its turn with tool calls */
    PB_FINISH_CANCELLED = 4,       /* run_cancel was honoured */
    PB_FINISH_TIME_LIMIT = 5,      /* max_wall_ms was reached */
};

/**
 * One event. The plugin fills `struct_size = sizeof(pb_event)` and the fields
 * that its `type` names; the others stay zero. Pointers are valid only during
 * the callback. `text` is UTF-8 of `text_len` bytes and need not be
 * NUL-terminated; a plugin should not split a UTF-8 sequence across events.
 */
typedef struct pb_event {
    uint32_t struct_size;
    pb_event_type type;
    const char *text;
    size_t text_len;
    /* PB_EVENT_TOOL_CALL_DELTA */
    int32_t tool_index;
    const char *tool_call_id; /* NUL-terminated or NULL */
    const char *tool_name;    /* NUL-terminated or NULL */
    /* PB_EVENT_USAGE */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    int64_t cached_tokens;
    /* PB_EVENT_TIMINGS */
    double prompt_ms;
    double predicted_ms;
    double prompt_per_second;
    double predicted_per_second;
    /* PB_EVENT_FINISH */
    pb_finish_reason finish_reason;
    /* PB_EVENT_ERROR */
    pb_status error_code;
} pb_event;

/**
 * Where a run delivers its events. Owned by the host, valid for the duration
 * of run_execute. `on_event` may be called from any thread, but never
 * concurrently for one run, and never after the terminal event. Every run
 * that run_execute accepted ends with exactly one terminal event
 * (PB_EVENT_FINISH or PB_EVENT_ERROR), also when it was cancelled or failed.
 */
typedef struct pb_event_sink {
    uint32_t struct_size;
    void *context;
    void (*on_event)(void *context, const pb_event *event);
} pb_event_sink;

/* ─── Load ──────────────────────────────────────────────────────────────── */

/**
 * Load progress callbacks. Owned by the host, valid for the duration of `load`.
 * `phase` is a short NUL-terminated word ("mmap", "warmup", "ready", …);
 * `bytes_total` is 0 when unknown. The return value is the host's answer:
 * 0 = go on, non-zero = the load was cancelled, stop and return
 * PB_ERR_CANCELLED. A plugin should report progress at least every 100 ms
 * during a long load so that a cancel is noticed quickly.
 */
typedef struct pb_load_callbacks {
    uint32_t struct_size;
    void *context;
    int32_t (*progress)(void *context, const char *phase, uint64_t bytes_loaded, uint64_t bytes_total);
} pb_load_callbacks;

/** What the host learns about a loaded model. The host sets struct_size; the plugin fills what it knows. */
typedef struct pb_model_info {
    uint32_t struct_size;
    /** Effective context length in tokens, 0 if unknown. */
    int64_t context_length;
    /** PB_CAP_* bits this particular model supports (e.g. vision only with a projector). */
    uint64_t capabilities;
} pb_model_info;

/* ─── The host's table (host → plugin) ─────────────────────────────────── */

typedef int32_t pb_log_level;
enum { PB_LOG_DEBUG = 0, PB_LOG_INFO = 1, PB_LOG_WARNING = 2, PB_LOG_ERROR = 3 };

/**
 * Services the host offers. The host makes one table per plugin; it is owned
 * by the host and valid until the process ends, so the plugin may keep the
 * pointer. All functions are thread-safe; pass `context` back as it is.
 */
typedef struct pb_host_api {
    uint32_t struct_size;
    uint16_t abi_major;
    uint16_t abi_minor;
    void *context;
    /** Write a line to the host's log under the plugin's name. `message` is NUL-terminated. */
    void (*log)(void *context, pb_log_level level, const char *message);
} pb_host_api;

/* ─── The plugin's table (plugin → host) ───────────────────────────────── */

/**
 * What a plugin is and does. Returned by pb_plugin_entry; must stay valid and
 * unchanged until the process ends (a static const table is the usual way).
 * Functions marked OPTIONAL may be NULL; the matching capability bit says so.
 * Every function that takes `error` / `error_size` writes a NUL-terminated,
 * human-readable message into that buffer when it returns an error status.
 */
typedef struct pb_plugin_api {
    uint32_t struct_size;  /* sizeof(pb_plugin_api) as the plugin was compiled */
    uint16_t abi_major;    /* PB_ABI_VERSION_MAJOR as the plugin was compiled */
    uint16_t abi_minor;    /* PB_ABI_VERSION_MINOR as the plugin was compiled */

    /* Self-description: NUL-terminated, static. */
    const char *name;          /* unique, e.g. "llama-server"; what `backend` selects */
    const char *version;       /* the plugin's own version, e.g. "1.2.0" */
    const char *description;   /* one line for humans */
    const char *model_formats; /* comma-separated file extensions it claims, e.g. "gguf" */
    uint64_t capabilities;     /* PB_CAP_* bits */

    /**
     * Load a model. `request_json` is the load request (model_path,
     * max_seq_length, chat_template_override, cache_type_kv, …; unknown
     * fields ignored). Blocks until the model is ready, failed or cancelled
     * through `callbacks->progress`. On PB_OK `*out_model` is set.
     */
    pb_status (*load)(const char *request_json, const pb_load_callbacks *callbacks,
                      pb_model **out_model, char *error, size_t error_size);

    /** Describe a loaded model. The host sets info->struct_size first. Never fails. */
    void (*model_info)(pb_model *model, pb_model_info *info);

    /**
     * Release a model. The host calls it only once no run of the model is
     * alive (every run_destroy has returned). After it returns the handle is
     * dead and every process or thread the model owned is gone.
     */
    void (*unload)(pb_model *model);

    /**
     * Create a run for one normalized request (see the top of this file).
     * Cheap: validates and prepares, does no engine work. On PB_OK `*out_run`
     * is set and run_cancel may be called on it from that moment.
     */
    pb_status (*run_create)(pb_model *model, const char *request_json,
                            pb_run **out_run, char *error, size_t error_size);

    /**
     * Do the work: blocks until the run ends and delivers events to `sink`,
     * ending with exactly one terminal event. If the run was cancelled before
     * or during execution it ends promptly with PB_EVENT_FINISH /
     * PB_FINISH_CANCELLED (whatever was produced so far is still delivered
     * first). Called at most once per run.
     */
    void (*run_execute)(pb_run *run, const pb_event_sink *sink);

    /**
     * Ask a run to stop. Idempotent, thread-safe, non-blocking, callable at
     * any point between run_create and run_destroy: before run_execute (the
     * run then ends at once when executed), during prompt processing, during
     * decoding, or after the run ended (no effect).
     */
    void (*run_cancel)(pb_run *run);

    /** Free a run. Called once, after run_execute returned (or instead of it). */
    void (*run_destroy)(pb_run *run);

    /**
     * OPTIONAL (PB_CAP_TOKENIZE). Count the tokens of a normalized request
     * (chat messages rendered with the model's template, or a raw prompt).
     */
    pb_status (*count_tokens)(pb_model *model, const char *request_json,
                              int64_t *out_count, char *error, size_t error_size);

    /**
     * OPTIONAL (PB_CAP_EMBEDDINGS). Embed one UTF-8 text (`text_len` bytes)
     * into `out` (capacity `out_capacity` floats). `*out_dimensions` is set to
     * the model's dimension; if it exceeds the capacity, returns
     * PB_ERR_INVALID_REQUEST and the host calls again with a larger buffer.
     */
    pb_status (*embed)(pb_model *model, const char *text, size_t text_len,
                       float *out, size_t out_capacity, size_t *out_dimensions,
                       char *error, size_t error_size);
} pb_plugin_api;

/**
 * The entry point every plugin exports, found with dlsym(PB_PLUGIN_ENTRY_SYMBOL).
 * Called once, right after the library is opened, on any thread. Returns the
 * plugin's table, or NULL if the plugin cannot run on this host (it should
 * log why through host->log first). The plugin checks host->abi_major itself
 * and may keep `host`.
 */
typedef const pb_plugin_api *(*pb_plugin_entry_fn)(const pb_host_api *host);

#ifdef __cplusplus
}
#endif

#endif /* PATCHBAY_H */
