/*
 * The Patchbay C template: a complete backend plugin in plain C, against patchbay.h and three
 * small files of Plugins/PluginSupport (README.md here says which). Copy this folder to start
 * your own backend (docs/writing-a-backend.md walks through the contract).
 *
 * The "engine" echoes. A model is any text file ending in `.echo`; it may hold `key=value`
 * lines, the same as the Rust and Swift templates' model files:
 *
 *   reply=Hello from C.    a scripted reply instead of the echo
 *   token_delay_ms=20      time per word (default 0)
 *   context_length=4096    what model_info reports; longer prompts are refused
 *
 * A chat is answered with its last user message, a completion with its prompt, word by word:
 * a word and the spaces after it are one token.
 *
 * What the host calls, and on which thread (the annotations of patchbay.h):
 *   pb_plugin_entry  once, when the library is opened: PB_PLUGIN_ENTRY at the bottom
 *   probe            [non-blocking]  is this file one of mine? (its name and an open, no reading)
 *   load             [blocking]      reads the model file, reports progress
 *   model_info       [non-blocking]  describes the model (only the fields the host has room for)
 *   run_create       [non-blocking]  parses one request; no engine work yet
 *   run_execute      [blocking]      streams the words, then usage, then exactly one FINISH
 *   run_cancel       [any-thread]    sets a flag and wakes run_execute; idempotent
 *   run_destroy, unload, shutdown    free what the matching call made
 *
 * Rules this file keeps (see the top of patchbay.h):
 *  - Nothing crosses the boundary to be freed by the other side: strings the host passes in are
 *    borrowed for the call, strings in an event live only during on_event.
 *  - Every struct the host hands over is read (or written) only inside its struct_size (PB_HAS).
 *  - Every event goes out through plugin_emit and its helpers (plugin_events.h): they set
 *    struct_size and give a 1.0 host only what 1.0 knows, so the plugin works with any 1.x host.
 *  - Every call that fails writes a message into the caller's error buffer.
 */
#include "patchbay.h"
#include "json_reader.h"
#include "plugin_events.h"
#include "plugin_util.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

/* ─── Who this plugin is: change these for your backend ─────────────────────────────────── */

#define PLUGIN_NAME "c-template" /* unique among the host's plugins; what `backend` selects */
#define PLUGIN_VERSION "0.1.0"
#define PLUGIN_DESCRIPTION "C template: streams an echo (or a scripted reply) word by word"
#define MODEL_FORMAT "echo"         /* the file extension it claims */
#define ARCHITECTURE "c-template"   /* model_info's architecture */
/* How many runs of one model may decode at once (model_info's parallel_slots): the host queues
 * the rest. Each run here decodes on its own host thread, so any number would do. */
#define PARALLEL_SLOTS 4

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *copy = malloc(n);
    if (copy) memcpy(copy, s, n);
    return copy;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* The length of the token at `text`: leading spaces, a word, the spaces after it (0 at the end).
 * It splits only at ASCII spaces, so no token ends inside a UTF-8 sequence. */
static size_t next_token(const char *text) {
    size_t n = 0;
    while (is_space(text[n])) n++;
    while (text[n] && !is_space(text[n])) n++;
    while (is_space(text[n])) n++;
    return n;
}

/* The words of a text: what this engine counts as the prompt's tokens. */
static int64_t count_words(const char *text) {
    int64_t count = 0;
    for (; text && *text; text++)
        if (!is_space(*text) && (count == 0 || is_space(text[-1]))) count++;
    return count;
}

/* ─── The model ─────────────────────────────────────────────────────────────────────────── */

struct pb_model {
    char *path;
    char *reply; /* NULL: echo */
    int64_t token_delay_ms;
    int64_t context_length;
    uint64_t size_bytes;
};

static void free_model(pb_model *m) {
    if (!m) return;
    free(m->path);
    free(m->reply);
    free(m);
}

/* Reads a model file: `key=value` lines, `#` comments, unknown keys ignored. */
static pb_status read_model(pb_model *m, FILE *f, char *error, size_t error_size) {
    char *line = NULL;
    size_t capacity = 0;
    pb_status status = PB_OK;
    for (int number = 1; status == PB_OK && getline(&line, &capacity, f) >= 0; number++) {
        line[strcspn(line, "\r\n")] = '\0';
        char *equals = strchr(line, '=');
        if (line[0] == '#' || !equals) continue;
        *equals = '\0';
        char *key = line, *value = equals + 1, *end;
        while (is_space(*key)) key++;
        for (char *last = equals - 1; last >= key && is_space(*last); last--) *last = '\0';
        if (!strcmp(key, "reply")) {
            free(m->reply);
            if (!(m->reply = copy_string(value))) status = PB_ERR_OUT_OF_MEMORY;
        } else if (!strcmp(key, "token_delay_ms") || !strcmp(key, "context_length")) {
            errno = 0;
            long long n = strtoll(value, &end, 10);
            while (is_space(*end)) end++;
            if (errno || end == value || *end || n < 0) {
                plugin_set_error(error, error_size, "%s:%d: %s must be a whole number", m->path, number, key);
                status = PB_ERR_LOAD_FAILED;
            } else if (!strcmp(key, "token_delay_ms")) {
                m->token_delay_ms = n;
            } else {
                m->context_length = n;
            }
        }
    }
    if (status == PB_ERR_OUT_OF_MEMORY) plugin_set_error(error, error_size, "out of memory");
    free(line);
    return status;
}

static pb_status echo_load(const char *request_json, const pb_load_callbacks *callbacks, pb_model **out_model,
                           char *error, size_t error_size) {
    json_value *request = json_parse(request_json);
    const char *path = json_get_string(request, "model_path");
    if (!path) {
        json_free(request);
        plugin_set_error(error, error_size, "the load request has no model_path");
        return PB_ERR_INVALID_REQUEST;
    }
    pb_model *m = calloc(1, sizeof *m);
    if (!m || !(m->path = copy_string(path))) {
        json_free(request);
        free_model(m);
        plugin_set_error(error, error_size, "out of memory");
        return PB_ERR_OUT_OF_MEMORY;
    }
    json_free(request);
    m->context_length = 4096;
    FILE *f = fopen(m->path, "r");
    if (!f) {
        int failure = errno;
        plugin_set_error(error, error_size, "cannot open %s: %s", m->path, strerror(failure));
        free_model(m);
        return failure == ENOENT ? PB_ERR_NOT_FOUND : PB_ERR_LOAD_FAILED;
    }
    struct stat info;
    if (fstat(fileno(f), &info) == 0) m->size_bytes = (uint64_t)info.st_size;
    pb_status status = read_model(m, f, error, error_size);
    fclose(f);
    if (status != PB_OK) {
        free_model(m);
        return status;
    }
    /* Progress: a real engine reports at least every 100 ms while it reads its weights. The
     * callbacks are the host's: `progress` is read only when it lies inside their size. A
     * non-zero answer means the host cancelled the load. */
    if (callbacks && PB_HAS(callbacks, progress) && callbacks->progress &&
        callbacks->progress(callbacks->context, "ready", m->size_bytes, m->size_bytes) != 0) {
        plugin_set_error(error, error_size, "the load of %s was cancelled", m->path);
        free_model(m);
        return PB_ERR_CANCELLED;
    }
    plugin_log(plugin_host, PB_LOG_INFO, "loaded %s", m->path);
    *out_model = m;
    return PB_OK;
}

/* The host zeroed `info` and declared its size: a 1.0 host's struct ends after `capabilities`,
 * and writing past it would scribble on the host's memory. */
static void echo_model_info(pb_model *m, pb_model_info *info) {
    if (PB_HAS(info, context_length)) info->context_length = m->context_length;
    if (PB_HAS(info, capabilities)) info->capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION;
    if (PB_HAS(info, parallel_slots)) info->parallel_slots = PARALLEL_SLOTS;
    if (PB_HAS(info, training_context_length)) info->training_context_length = m->context_length;
    if (PB_HAS(info, size_bytes)) info->size_bytes = m->size_bytes;
    if (PB_HAS(info, architecture)) info->architecture = ARCHITECTURE;
}

/* The host calls this only once every run of the model was destroyed. */
static void echo_unload(pb_model *m) {
    plugin_log(plugin_host, PB_LOG_INFO, "unloaded %s", m->path);
    free_model(m);
}

/* Claims a file by its name and that it opens: cheap enough for the host's event loop. */
static int32_t echo_probe(const char *model_path, char *detail, size_t detail_size) {
    size_t length = model_path ? strlen(model_path) : 0, suffix = strlen("." MODEL_FORMAT);
    if (length <= suffix || strcasecmp(model_path + length - suffix, "." MODEL_FORMAT) != 0) return 0;
    FILE *f = fopen(model_path, "r");
    if (!f) return 0;
    fclose(f);
    plugin_set_error(detail, detail_size, "a text file for the echo engine");
    return 100; /* exactly my format */
}

/* ─── A run ─────────────────────────────────────────────────────────────────────────────── */

struct pb_run {
    char *reply; /* what the engine "generates", worked out in run_create */
    int64_t max_tokens, prompt_tokens, token_delay_ms;
    double max_wall_ms; /* 0: no limit */
    char request_id[128];
    /* Set by run_cancel from any thread; `wake` cuts run_execute's sleeps short. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int cancelled;
};

/* The text of a message's content: a string, or its text parts joined by spaces (malloc'd). */
static char *content_text(const json_value *content) {
    if (content && content->kind == JSON_STRING) return copy_string(content->string);
    size_t length = 0;
    for (size_t i = 0; content && content->kind == JSON_ARRAY && i < content->count; i++) {
        const char *text = json_get_string(&content->items[i], "text");
        if (text) length += strlen(text) + 1;
    }
    char *joined = calloc(1, length + 1);
    for (size_t i = 0; joined && content && content->kind == JSON_ARRAY && i < content->count; i++) {
        const char *text = json_get_string(&content->items[i], "text");
        if (!text) continue;
        if (joined[0]) strcat(joined, " ");
        strcat(joined, text);
    }
    return joined;
}

/* Reads the request (the top of patchbay.h): the prompt's size and what to answer. */
static pb_status prepare_run(pb_run *run, const pb_model *m, const json_value *request, char *error,
                             size_t error_size) {
    const char *kind = json_get_string(request, "kind");
    char *echo = NULL;
    if (kind && !strcmp(kind, "chat")) {
        const json_value *messages = json_get(request, "messages");
        for (size_t i = 0; messages && messages->kind == JSON_ARRAY && i < messages->count; i++) {
            char *text = content_text(json_get(&messages->items[i], "content"));
            if (!text) { free(echo); goto out_of_memory; }
            run->prompt_tokens += count_words(text);
            const char *role = json_get_string(&messages->items[i], "role");
            if (role && !strcmp(role, "user")) { free(echo); echo = text; } else free(text);
        }
    } else if (kind && !strcmp(kind, "completion")) {
        const char *prompt = json_get_string(request, "prompt");
        if (!(echo = copy_string(prompt ? prompt : ""))) goto out_of_memory;
        run->prompt_tokens = count_words(echo);
    } else if (kind) {
        plugin_set_error(error, error_size, "this backend does not serve requests of kind '%s'", kind);
        return PB_ERR_UNSUPPORTED;
    } else {
        plugin_set_error(error, error_size, "the request has no kind");
        return PB_ERR_INVALID_REQUEST;
    }
    if (run->prompt_tokens > m->context_length) {
        free(echo);
        plugin_set_error(error, error_size, "the prompt (%lld tokens) exceeds the context (%lld tokens)",
                  (long long)run->prompt_tokens, (long long)m->context_length);
        return PB_ERR_CONTEXT_LENGTH_EXCEEDED;
    }
    /* THE ENGINE: what this template "generates", worked out up front. Your backend's engine goes
     * here and in run_execute's loop (which would decode one token per step). */
    if (m->reply) {
        free(echo);
        run->reply = copy_string(m->reply);
    } else if (!echo || count_words(echo) == 0) {
        free(echo);
        run->reply = copy_string("(nothing to echo)");
    } else {
        run->reply = echo;
    }
    if (!run->reply) goto out_of_memory;
    /* Always present (the host applies its default); the context bounds it anyway. */
    run->max_tokens = json_get_int64(request, "max_tokens", m->context_length);
    run->max_wall_ms = json_get_number(request, "max_wall_ms", 0);
    run->token_delay_ms = m->token_delay_ms;
    const char *request_id = json_get_string(request, "request_id");
    snprintf(run->request_id, sizeof run->request_id, "%s", request_id ? request_id : "-");
    return PB_OK;
out_of_memory:
    plugin_set_error(error, error_size, "out of memory");
    return PB_ERR_OUT_OF_MEMORY;
}

static void free_run(pb_run *run) {
    pthread_cond_destroy(&run->wake);
    pthread_mutex_destroy(&run->lock);
    free(run->reply);
    free(run);
}

/* [non-blocking] Validates and prepares; the engine does nothing until run_execute. */
static pb_status echo_run_create(pb_model *m, const char *request_json, pb_run **out_run, char *error,
                                 size_t error_size) {
    json_value *request = json_parse(request_json);
    if (!request || request->kind != JSON_OBJECT) {
        json_free(request);
        plugin_set_error(error, error_size, "the request is not a JSON object");
        return PB_ERR_INVALID_REQUEST;
    }
    pb_run *run = calloc(1, sizeof *run);
    if (!run) {
        json_free(request);
        plugin_set_error(error, error_size, "out of memory");
        return PB_ERR_OUT_OF_MEMORY;
    }
    pthread_mutex_init(&run->lock, NULL);
    pthread_cond_init(&run->wake, NULL);
    pb_status status = prepare_run(run, m, request, error, error_size);
    json_free(request);
    if (status != PB_OK) {
        free_run(run);
        return status;
    }
    *out_run = run; /* from here on run_cancel may be called on it, from any thread */
    return PB_OK;
}

/* Waits up to `ms`, or less when cancelled. Returns whether the run is cancelled. */
static int sleep_unless_cancelled(pb_run *run, double ms) {
    struct timespec deadline; /* CLOCK_REALTIME, which pthread_cond_timedwait uses everywhere */
    clock_gettime(CLOCK_REALTIME, &deadline);
    long long ns = deadline.tv_nsec + (long long)((ms > 0 ? ms : 0) * 1e6);
    deadline.tv_sec += (time_t)(ns / 1000000000LL);
    deadline.tv_nsec = (long)(ns % 1000000000LL);
    pthread_mutex_lock(&run->lock);
    while (!run->cancelled && ms > 0 && pthread_cond_timedwait(&run->wake, &run->lock, &deadline) != ETIMEDOUT) {}
    int cancelled = run->cancelled;
    pthread_mutex_unlock(&run->lock);
    return cancelled;
}

static void echo_run_execute(pb_run *run, const pb_event_sink *sink) {
    double deadline = run->max_wall_ms > 0 ? plugin_now_ms() + run->max_wall_ms : 0;
    const char *at = run->reply;
    int64_t produced = 0;
    pb_finish_reason finish;
    /* The generation loop: one word per step, cancel checked before every word. */
    for (;;) {
        size_t length = next_token(at);
        if (length == 0) { finish = PB_FINISH_STOP; break; } /* the reply is complete */
        if (produced >= run->max_tokens) { finish = PB_FINISH_LENGTH; break; }
        /* Pace the word; a cancel (also one that came before run_execute) ends the wait at once. */
        double wait = (double)run->token_delay_ms;
        if (deadline > 0 && deadline - plugin_now_ms() < wait) wait = deadline - plugin_now_ms();
        if (sleep_unless_cancelled(run, wait)) { finish = PB_FINISH_CANCELLED; break; }
        if (deadline > 0 && plugin_now_ms() >= deadline) { finish = PB_FINISH_TIME_LIMIT; break; }
        /* Not PB_FLAG_BATCHING: on_event may block while the client is behind; a cancel releases it. */
        plugin_emit_text(sink, PB_EVENT_CONTENT_DELTA, at, length);
        at += length;
        produced++;
    }
    /* The end of every run: usage, then exactly one terminal event, whatever happened. */
    pb_event usage = {0};
    usage.type = PB_EVENT_USAGE;
    usage.prompt_tokens = run->prompt_tokens;
    usage.completion_tokens = produced;
    plugin_emit(sink, &usage);
    const char *why = finish == PB_FINISH_STOP ? "stop" : finish == PB_FINISH_LENGTH ? "length"
                    : finish == PB_FINISH_CANCELLED ? "cancelled" : "time limit";
    plugin_log(plugin_host, PB_LOG_INFO, "request %s: run ended (%s) after %lld tokens", run->request_id, why,
               (long long)produced);
    plugin_emit_finish(sink, finish, NULL);
}

/* [non-blocking][any-thread], idempotent: before, during or after run_execute. */
static void echo_run_cancel(pb_run *run) {
    pthread_mutex_lock(&run->lock);
    run->cancelled = 1;
    pthread_cond_broadcast(&run->wake);
    pthread_mutex_unlock(&run->lock);
}

static void echo_run_destroy(pb_run *run) { free_run(run); }

/* ABI 1.1, optional: the host exits. This plugin has no threads or global state to stop. */
static void echo_shutdown(void) { plugin_log(plugin_host, PB_LOG_INFO, PLUGIN_NAME " plugin shut down"); }

/* ─── The table and the entry point ─────────────────────────────────────────────────────── */

/* Valid and unchanged until the process ends, as the host requires: a static const table. */
static const pb_plugin_api template_api = {
    .struct_size = sizeof(pb_plugin_api),
    .abi_major = PB_ABI_VERSION_MAJOR,
    .abi_minor = PB_ABI_VERSION_MINOR,
    .name = PLUGIN_NAME,
    .version = PLUGIN_VERSION,
    .description = PLUGIN_DESCRIPTION,
    .model_formats = MODEL_FORMAT,
    .capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION,
    .load = echo_load,
    .model_info = echo_model_info,
    .unload = echo_unload,
    .run_create = echo_run_create,
    .run_execute = echo_run_execute,
    .run_cancel = echo_run_cancel,
    .run_destroy = echo_run_destroy,
    /* count_tokens, embed (optional, with PB_CAP_TOKENIZE / PB_CAP_EMBEDDINGS): left NULL. */
    /* ── ABI 1.1 ── flags 0: not PB_FLAG_BATCHING, each run decodes on the host thread that
     * executes it. run_create_with_inputs NULL: no byte inputs (images, audio). */
    .probe = echo_probe,
    .shutdown = echo_shutdown,
};

/* The one exported symbol: declines a host of another major, keeps the host's table in
 * plugin_host (for plugin_log and plugin_emit), and returns the table. 0: any 1.x host will do,
 * since plugin_emit sends a 1.0 host only what 1.0 knows. */
PB_PLUGIN_ENTRY(template_api, 0, NULL)
