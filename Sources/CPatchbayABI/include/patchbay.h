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
 *    own `struct_size`, set by whoever writes it to the sizeof it was compiled
 *    with. THE RULE: a reader touches a field only when it lies inside the
 *    writer's `struct_size` (PB_HAS below), and reads a field past it as zero /
 *    NULL. This holds for both tables and every struct, in both directions.
 *  - The sizes of each version are frozen below (PB_*_SIZE_1_0, …), so a
 *    reader can also ask "is this at least a 1.0 struct?".
 *  - Anything else (removing, reordering, retyping a field, changing a
 *    signature or a documented behaviour) bumps MAJOR. The host refuses a
 *    plugin whose major differs from its own, with a message naming the file
 *    and both versions.
 *  - The first three fields of pb_plugin_api and pb_host_api (struct_size,
 *    abi_major, abi_minor) never move, in any version.
 *  - A plugin uses what a minor added only when the host's abi_minor (in
 *    pb_host_api) is at least that minor: it sends an event type, finish
 *    reason or status code of 1.1 only to a 1.1 host, and the nearest 1.0
 *    value to a 1.0 host (PB_FINISH_STOP for PB_FINISH_STOP_SEQUENCE,
 *    PB_ERR_ENGINE_UNAVAILABLE for PB_ERR_BUSY, …). A host ignores event types
 *    it does not know, and reads an unknown finish reason as PB_FINISH_STOP and
 *    an unknown status as PB_ERR_INTERNAL.
 *
 * ─── Memory ───────────────────────────────────────────────────────────────
 * Nothing is freed across the boundary. Strings passed into a call are owned
 * by the caller and valid only for the duration of that call. Strings inside
 * an event are valid only during the event callback; the host copies what it
 * keeps. Error messages are written into a caller-provided buffer.
 *
 * Byte inputs (audio, images; ABI 1.1) cross beside the JSON as pb_byte_input
 * buffers, never as base64; they stay valid until run_destroy returns.
 *
 * ─── Threads ──────────────────────────────────────────────────────────────
 * Each function below carries one annotation:
 *  [blocking]     may block for as long as the work takes; the host calls it
 *                 on a thread of its own (never an event loop).
 *  [non-blocking] returns promptly (no engine work, no waiting on I/O or on
 *                 another run); the host may call it from an event loop.
 *  [any-thread]   may be called from any thread, concurrently with the
 *                 plugin's other functions.
 * run_cancel may be called at any time between run_create and run_destroy,
 * concurrently with run_execute, any number of times.
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
 *   "max_wall_ms": integer — the generation must end by this wall-clock budget;
 *                  a run that reaches it ends with PB_FINISH_TIME_LIMIT
 *   "request_id":  string, when the host has one: the HTTP request's id
 *                  (x-request-id); name it in log lines about this run
 *
 * ABI 1.1 adds, for a plugin whose table has run_create_with_inputs:
 *   - An image part may come as {"type":"image","image":{"input":NAME}}: the
 *     bytes are the byte input NAME (its media_type says the format). The
 *     host sends this shape instead of a base64 `data:` URL to such plugins.
 *   - "kind": "transcription" (PB_CAP_TRANSCRIPTION) — speech to text:
 *       "audio":       {"input": NAME}, always present: the byte input holding
 *                      the audio file (media_type e.g. "audio/wav")
 *       "language":    string (ISO 639-1, e.g. "en"), when set; absent = detect
 *       "prompt":      string, when set: text that conditions the decoder
 *       "temperature": number, when set
 *       "max_wall_ms": as above
 *     Events: PB_EVENT_LANGUAGE once (the language used or detected), then a
 *     PB_EVENT_SEGMENT per decoded segment in order (start/end in ms from the
 *     start of the audio), PB_EVENT_USAGE (completion_tokens = text tokens;
 *     prompt_tokens may be 0), and the terminal event. Undecodable audio is
 *     PB_ERR_INVALID_REQUEST.
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
#define PB_ABI_VERSION_MINOR 1

/** The one symbol a plugin exports. */
#define PB_PLUGIN_ENTRY_SYMBOL "pb_plugin_entry"

#if defined(_WIN32)
#define PB_EXPORT __declspec(dllexport)
#else
#define PB_EXPORT __attribute__((visibility("default")))
#endif

/**
 * The number of bytes of `type` up to and including `field`: the size a
 * writer of that version declared. Used to freeze each version's sizes.
 */
#define PB_SIZE_THROUGH(type, field) (offsetof(type, field) + sizeof(((type *)0)->field))

/**
 * Whether `field` of the struct at `ptr` lies inside the size its writer
 * declared in `ptr->struct_size`: read (or, for a struct the other side
 * hands you to fill, write) a field only when this is true.
 *
 *     if (PB_HAS(info, parallel_slots)) info->parallel_slots = 4;
 *     int64_t total = PB_HAS(event, progress_total) ? event->progress_total : 0;
 */
#define PB_HAS(ptr, field) \
    ((ptr)->struct_size >= (size_t)((const char *)&(ptr)->field - (const char *)(ptr)) + sizeof((ptr)->field))

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
    /** 1.1: every slot of the engine is taken; try again later (host answers 429 with Retry-After). */
    PB_ERR_BUSY = 10,
    /** 1.1: the engine is overloaded or not ready (a model still warming up, memory pressure) (503 with Retry-After). */
    PB_ERR_OVERLOADED = 11,
    /** 1.1: the engine did not answer in time (503 with Retry-After). */
    PB_ERR_TIMED_OUT = 12,
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
    PB_CAP_TRANSCRIPTION = 1u << 8, /* 1.1: requests of kind "transcription" (needs run_create_with_inputs) */
};

/** Bits in pb_plugin_api.flags (1.1): how the plugin works, as opposed to what it offers. */
enum {
    /**
     * The engine serves many runs from one thread (continuous batching). For
     * such a plugin the host's on_event never blocks; the plugin instead
     * pauses a run while the sink's backlog() is at or above backlog_limit
     * (see pb_event_sink). Without this flag on_event may block.
     */
    PB_FLAG_BATCHING = 1u << 0,
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
    PB_EVENT_FINISH = 6,           /* TERMINAL. finish_reason; text: the matched stop sequence (PB_FINISH_STOP_SEQUENCE) */
    PB_EVENT_ERROR = 7,            /* TERMINAL. error_code, text: the message, retry_after_ms (1.1) */
    PB_EVENT_PROGRESS = 8,         /* 1.1: prompt processing: progress_processed of progress_total tokens, progress_cached reused */
    PB_EVENT_SEGMENT = 9,          /* 1.1: transcription: text, segment_start_ms, segment_end_ms */
    PB_EVENT_LANGUAGE = 10,        /* 1.1: transcription: text = the language (ISO 639-1), language_probability */
};

typedef int32_t pb_finish_reason;
enum {
    PB_FINISH_STOP = 1,            /* natural end (or, on a 1.0 host, a stop sequence) */
    PB_FINISH_LENGTH = 2,          /* max_tokens or the context window was reached */
    PB_FINISH_TOOL_CALLS = 3,      /* the model ended its turn with tool calls */
    PB_FINISH_CANCELLED = 4,       /* run_cancel was honoured */
    PB_FINISH_TIME_LIMIT = 5,      /* max_wall_ms was reached */
    PB_FINISH_STOP_SEQUENCE = 6,   /* 1.1: a stop string matched; the event's text is the string */
};

/**
 * One event. The plugin fills `struct_size = sizeof(pb_event)` and the fields
 * that its `type` names; the others stay zero. Pointers are valid only during
 * the callback. `text` is UTF-8 of `text_len` bytes and need not be
 * NUL-terminated; a plugin must not split a UTF-8 sequence across events.
 * The host reads only the fields inside `struct_size` (a 1.0 plugin's events
 * simply have no progress or retry fields).
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
    /* ── ABI 1.1 ── */
    /* PB_EVENT_ERROR: for PB_ERR_BUSY / OVERLOADED / TIMED_OUT, when to try again (0 = not said) */
    uint32_t retry_after_ms;
    /* PB_EVENT_PROGRESS: prompt tokens processed so far, of the total; cached = reused from a cache */
    int64_t progress_processed;
    int64_t progress_total;
    int64_t progress_cached;
    /* PB_EVENT_SEGMENT: where the segment lies in the audio, in ms from its start */
    int64_t segment_start_ms;
    int64_t segment_end_ms;
    /* PB_EVENT_LANGUAGE: the detector's confidence in [0, 1] (0 = not said / given by the request) */
    double language_probability;
} pb_event;

/**
 * Where a run delivers its events. Owned by the host, valid for the duration
 * of run_execute. `on_event` may be called from any thread, but never
 * concurrently for one run, and never after the terminal event. Every run
 * that run_execute accepted ends with exactly one terminal event
 * (PB_EVENT_FINISH or PB_EVENT_ERROR), also when it was cancelled or failed.
 *
 * Backpressure. The host buffers a bounded number of events per run for a
 * client that reads slower than the engine writes.
 *  - A plugin without PB_FLAG_BATCHING (one thread per run): on_event
 *    [blocking] may block while that run's client is behind. This is the
 *    simple way to keep memory flat; a cancel releases the block at once.
 *  - A plugin with PB_FLAG_BATCHING (many runs decoded by one thread):
 *    on_event [non-blocking] never blocks, so one slow client never stalls
 *    the others. The plugin keeps memory bounded itself: before it computes
 *    the next token of a run it checks `backlog(context)`, and while that is
 *    >= `backlog_limit` it leaves the run out of the batch (it stays alive,
 *    and a cancel still ends it at once). A plugin that ignores this is
 *    bounded by the host: past a hard limit of buffered bytes the host cancels
 *    the run and ends the response with an error.
 */
typedef struct pb_event_sink {
    uint32_t struct_size;
    void *context;
    void (*on_event)(void *context, const pb_event *event);
    /* ── ABI 1.1 ── */
    /** [non-blocking][any-thread] Events delivered for this run that its client has not taken yet. */
    uint32_t (*backlog)(void *context);
    /** A batching plugin pauses the run while backlog() >= backlog_limit. */
    uint32_t backlog_limit;
} pb_event_sink;

/* ─── Byte inputs (1.1) ────────────────────────────────────────────────── */

/**
 * One named buffer handed to a run beside its JSON request (audio, an image).
 * The JSON refers to it as {"input": name}. Owned by the host; the struct and
 * the bytes stay valid and unchanged from run_create_with_inputs until
 * run_destroy returns, so a plugin reads them in place without copying.
 */
typedef struct pb_byte_input {
    uint32_t struct_size;
    const char *name;       /* NUL-terminated, unique within the run */
    const char *media_type; /* NUL-terminated MIME type, e.g. "audio/wav", "image/png"; "" when unknown */
    const uint8_t *data;
    size_t size;
} pb_byte_input;

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

/**
 * What the host learns about a loaded model. The host zeroes it and sets
 * struct_size; the plugin fills what it knows, writing only the fields inside
 * struct_size (PB_HAS). 0 / NULL means "not known".
 */
typedef struct pb_model_info {
    uint32_t struct_size;
    /** Effective context length in tokens, 0 if unknown. */
    int64_t context_length;
    /** PB_CAP_* bits this particular model supports (e.g. vision only with a projector). */
    uint64_t capabilities;
    /* ── ABI 1.1 ── */
    /** How many runs the engine decodes at once for this model (its slots). */
    int32_t parallel_slots;
    /** The length of an embedding vector (PB_CAP_EMBEDDINGS). */
    int64_t embedding_dimensions;
    /** The context length the model was trained with. */
    int64_t training_context_length;
    /** Parameters in the model. */
    int64_t parameter_count;
    /** Bytes of weights (the file(s) loaded). */
    uint64_t size_bytes;
    /** The model's architecture, e.g. "llama" or "whisper". Valid until unload; NUL-terminated. */
    const char *architecture;
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
    /** [non-blocking][any-thread] Write a line to the host's log under the plugin's name. `message` is NUL-terminated. */
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
     * [blocking][any-thread] Load a model. `request_json` is the load request
     * (model_path, max_seq_length, chat_template_override, cache_type_kv, …;
     * unknown fields ignored). Blocks until the model is ready, failed or
     * cancelled through `callbacks->progress`. On PB_OK `*out_model` is set.
     * Several loads may run at once.
     */
    pb_status (*load)(const char *request_json, const pb_load_callbacks *callbacks,
                      pb_model **out_model, char *error, size_t error_size);

    /** [non-blocking][any-thread] Describe a loaded model into the host's zeroed `info` (see pb_model_info). Never fails. */
    void (*model_info)(pb_model *model, pb_model_info *info);

    /**
     * [blocking] Release a model. The host calls it once per model, only once
     * no run or call of the model is alive (every run_destroy has returned).
     * After it returns the handle is dead and every process or thread the
     * model owned is gone.
     */
    void (*unload)(pb_model *model);

    /**
     * [non-blocking][any-thread] Create a run for one normalized request (see
     * the top of this file). Cheap: validates and prepares, does no engine
     * work. On PB_OK `*out_run` is set and run_cancel may be called on it from
     * that moment.
     */
    pb_status (*run_create)(pb_model *model, const char *request_json,
                            pb_run **out_run, char *error, size_t error_size);

    /**
     * [blocking] Do the work: blocks until the run ends and delivers events to
     * `sink`, ending with exactly one terminal event. If the run was cancelled
     * before or during execution it ends promptly with PB_EVENT_FINISH /
     * PB_FINISH_CANCELLED (whatever was produced so far is still delivered
     * first). During long silent work (prompt processing, waiting for a slot)
     * a 1.1 plugin sends PB_EVENT_PROGRESS at least every second, so the host
     * can keep the client's connection alive and notice a client that left.
     * Called at most once per run, on a thread of the host's.
     */
    void (*run_execute)(pb_run *run, const pb_event_sink *sink);

    /**
     * [non-blocking][any-thread] Ask a run to stop. Idempotent, callable at
     * any point between run_create and run_destroy: before run_execute (the
     * run then ends at once when executed), during prompt processing, during
     * decoding, or after the run ended (no effect).
     */
    void (*run_cancel)(pb_run *run);

    /** [non-blocking] Free a run. Called once, after run_execute returned (or instead of it). */
    void (*run_destroy)(pb_run *run);

    /**
     * [blocking][any-thread] OPTIONAL (PB_CAP_TOKENIZE). Count the tokens of a normalized request
     * (chat messages rendered with the model's template, or a raw prompt).
     */
    pb_status (*count_tokens)(pb_model *model, const char *request_json,
                              int64_t *out_count, char *error, size_t error_size);

    /**
     * [blocking][any-thread] OPTIONAL (PB_CAP_EMBEDDINGS). Embed one UTF-8 text (`text_len` bytes)
     * into `out` (capacity `out_capacity` floats). `*out_dimensions` is set to
     * the model's dimension; if it exceeds the capacity, returns
     * PB_ERR_INVALID_REQUEST and the host calls again with a larger buffer.
     */
    pb_status (*embed)(pb_model *model, const char *text, size_t text_len,
                       float *out, size_t out_capacity, size_t *out_dimensions,
                       char *error, size_t error_size);

    /* ── ABI 1.1 ── every function below is OPTIONAL (may be NULL) ── */

    /** PB_FLAG_* bits. */
    uint64_t flags;

    /**
     * [non-blocking][any-thread] Whether, and how well, this plugin can load
     * the file at `model_path` (read its header, not the whole file). Returns
     * 0 (cannot), or a confidence from 1 to 100: 100 = this is exactly my
     * format; 50 = I can load it, but another backend may be the better fit.
     * May write one line of explanation into `detail` (NUL-terminated).
     * Without probe, the host matches `model_formats` against the file's
     * extension, as for a 1.0 plugin (score 50).
     */
    int32_t (*probe)(const char *model_path, char *detail, size_t detail_size);

    /**
     * [non-blocking][any-thread] run_create with byte inputs beside the JSON
     * (see pb_byte_input): `inputs` points to `input_count` pointers. Required
     * for PB_CAP_TRANSCRIPTION and for image parts given as byte inputs. When
     * the table has it, the host calls it for every run instead of run_create.
     */
    pb_status (*run_create_with_inputs)(pb_model *model, const char *request_json,
                                        const pb_byte_input *const *inputs, size_t input_count,
                                        pb_run **out_run, char *error, size_t error_size);

    /**
     * [blocking] Called once when the host exits, after every model was
     * unloaded: stop the plugin's own threads, release global state. No call
     * follows it. (The library is not unloaded afterwards.)
     */
    void (*shutdown)(void);
} pb_plugin_api;

/* ─── Frozen sizes ──────────────────────────────────────────────────────── */

/* What each version's writer declares in struct_size. Never change these. */
#define PB_PLUGIN_API_SIZE_1_0   PB_SIZE_THROUGH(pb_plugin_api, embed)
#define PB_PLUGIN_API_SIZE_1_1   PB_SIZE_THROUGH(pb_plugin_api, shutdown)
#define PB_HOST_API_SIZE_1_0     PB_SIZE_THROUGH(pb_host_api, log)
#define PB_EVENT_SIZE_1_0        PB_SIZE_THROUGH(pb_event, error_code)
#define PB_EVENT_SIZE_1_1        PB_SIZE_THROUGH(pb_event, language_probability)
#define PB_EVENT_SINK_SIZE_1_0   PB_SIZE_THROUGH(pb_event_sink, on_event)
#define PB_EVENT_SINK_SIZE_1_1   PB_SIZE_THROUGH(pb_event_sink, backlog_limit)
#define PB_LOAD_CALLBACKS_SIZE_1_0 PB_SIZE_THROUGH(pb_load_callbacks, progress)
#define PB_MODEL_INFO_SIZE_1_0   PB_SIZE_THROUGH(pb_model_info, capabilities)
#define PB_MODEL_INFO_SIZE_1_1   PB_SIZE_THROUGH(pb_model_info, architecture)
#define PB_BYTE_INPUT_SIZE_1_1   PB_SIZE_THROUGH(pb_byte_input, size)

/**
 * The entry point every plugin exports, found with dlsym(PB_PLUGIN_ENTRY_SYMBOL).
 * [non-blocking] Called once, right after the library is opened, on any
 * thread. Returns the plugin's table, or NULL if the plugin cannot run on this
 * host (it should log why through host->log first). The plugin checks
 * host->abi_major itself, may keep `host`, and reads host->abi_minor to know
 * which minor's events and codes the host understands (see Versioning).
 * The host reads the returned table only within its struct_size; a table
 * smaller than PB_PLUGIN_API_SIZE_1_0, or without name, load, model_info,
 * unload, run_create, run_execute, run_cancel and run_destroy, is refused.
 */
typedef const pb_plugin_api *(*pb_plugin_entry_fn)(const pb_host_api *host);

#ifdef __cplusplus
}
#endif

#endif /* PATCHBAY_H */
