/*
 * A minimal, correct Patchbay plugin (ABI 1.1): the base of the deliberately broken
 * plugins in broken/, each of which defines one BROKEN_* macro and includes this file.
 * `patchbay plugin check` passes this plugin and fails each broken one on exactly the
 * clause it breaks (Tests/e2e/test_conformance.py).
 *
 * The "engine": chat only, one run per host thread (no PB_FLAG_BATCHING). A model is any
 * file ending in .min. A run "processes its prompt" for 1 ms per 20 bytes of request
 * (reporting PB_EVENT_PROGRESS every 100 ms to a 1.1 host), then streams the words of a
 * fixed reply, 5 ms each, until max_tokens; it honours max_wall_ms and run_cancel.
 *
 * Build (as the test does):
 *   cc -std=gnu11 -shared -fPIC -fvisibility=hidden -I Sources/CPatchbayABI/include
 *      -I Plugins/PluginSupport/include Tests/conformance/minimal_plugin.c
 *      Plugins/PluginSupport/{json_buffer,json_reader,plugin_util}.c -o libminimal.so -lpthread -lm
 */
#include "patchbay.h"
#include "json_reader.h"
#include "plugin_util.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static const pb_host_api *g_host;

static const char *const k_reply = "Hello from the minimal plugin: café ☕, 日本語, and a few more words to stream.";

/* Every error message goes through here. */
static void set_error(char *error, size_t size, const char *fmt, ...) {
    char message[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    if (!error || size == 0) return;
#ifdef BROKEN_UNTERMINATED_ERROR
    /* The bug: the message is copied without its NUL, and cut at the buffer's size. */
    size_t length = strlen(message);
    memcpy(error, message, length < size ? length : size);
#else
    snprintf(error, size, "%s", message);
#endif
}

/* ─── Models ────────────────────────────────────────────────────────────── */

struct pb_model {
    char *path;
    uint64_t size;
};

static pb_status min_load(const char *request_json, const pb_load_callbacks *callbacks, pb_model **out_model,
                          char *error, size_t error_size) {
    json_value *request = json_parse(request_json);
    const char *path = json_get_string(request, "model_path");
    if (!path) {
        json_free(request);
        set_error(error, error_size, "the load request has no model_path");
        return PB_ERR_INVALID_REQUEST;
    }
    FILE *file = fopen(path, "rb");
    if (!file) {
        set_error(error, error_size, "cannot open %s: %s", path, strerror(errno));
        json_free(request);
        return PB_ERR_NOT_FOUND;
    }
    fseek(file, 0, SEEK_END);
    long size = ftell(file);
    fclose(file);
    pb_model *model = calloc(1, sizeof *model);
    model->path = strdup(path);
    model->size = size > 0 ? (uint64_t)size : 0;
    json_free(request);
    /* "Reading the weights": ten steps, each reported; the host may cancel. */
    int32_t (*progress)(void *, const char *, uint64_t, uint64_t) =
        callbacks && PB_HAS(callbacks, progress) ? callbacks->progress : NULL;
    for (int step = 0; step <= 10; step++) {
        if (progress && progress(callbacks->context, step == 10 ? "ready" : "read", (uint64_t)step * 100, 1000)) {
            set_error(error, error_size, "the load of %s was cancelled", model->path);
            free(model->path);
            free(model);
            return PB_ERR_CANCELLED;
        }
        if (step < 10) plugin_sleep_ms(5);
    }
    *out_model = model;
    return PB_OK;
}

static void min_model_info(pb_model *model, pb_model_info *info) {
    if (PB_HAS(info, context_length)) info->context_length = 4096;
    if (PB_HAS(info, capabilities)) info->capabilities = PB_CAP_CHAT;
    if (PB_HAS(info, parallel_slots)) info->parallel_slots = 8;
    if (PB_HAS(info, size_bytes)) info->size_bytes = model->size;
    if (PB_HAS(info, architecture)) info->architecture = "minimal";
}

static void min_unload(pb_model *model) {
    free(model->path);
    free(model);
}

static int32_t min_probe(const char *model_path, char *detail, size_t detail_size) {
    size_t length = model_path ? strlen(model_path) : 0;
    if (length < 4 || strcasecmp(model_path + length - 4, ".min") != 0 || access(model_path, R_OK) != 0) return 0;
    if (detail && detail_size > 0) snprintf(detail, detail_size, "a minimal model");
    return 100;
}

/* ─── Runs ──────────────────────────────────────────────────────────────── */

struct pb_run {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* cuts a run's sleeps short on cancel */
    int cancelled;
    int64_t max_tokens;
    double max_wall_ms;
    double prefill_ms;
    int64_t prompt_bytes;
};

static int is_cancelled(pb_run *run) { return __atomic_load_n(&run->cancelled, __ATOMIC_ACQUIRE); }

/* Sleeps up to `ms`; returns 1 at once when the run is cancelled. */
static int sleep_unless_cancelled(pb_run *run, double ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    long long ns = deadline.tv_nsec + (long long)(ms * 1e6);
    deadline.tv_sec += (time_t)(ns / 1000000000LL);
    deadline.tv_nsec = (long)(ns % 1000000000LL);
    pthread_mutex_lock(&run->lock);
    while (!run->cancelled && pthread_cond_timedwait(&run->wake, &run->lock, &deadline) != ETIMEDOUT) {}
    int cancelled = run->cancelled;
    pthread_mutex_unlock(&run->lock);
    return cancelled;
}

static pb_status min_run_create(pb_model *model, const char *request_json, pb_run **out_run, char *error,
                                size_t error_size) {
    (void)model;
    json_value *request = json_parse(request_json);
    if (!request || request->kind != JSON_OBJECT) {
        json_free(request);
#ifdef BROKEN_HEAP_OVERFLOW
        /* The bug: the message is built in a heap buffer one byte too small (its NUL). */
        const char *text = "the request is not a JSON object";
        char *copy = malloc(strlen(text));
        strcpy(copy, text);
        set_error(error, error_size, "%s", copy);
        free(copy);
#else
        set_error(error, error_size, "the request is not a JSON object");
#endif
        return PB_ERR_INVALID_REQUEST;
    }
    const char *kind = json_get_string(request, "kind");
    if (kind && strcmp(kind, "chat") != 0) {
        set_error(error, error_size, "the minimal plugin serves chat requests only, not '%s'", kind);
        json_free(request);
        return PB_ERR_UNSUPPORTED;
    }
    int64_t prompt_bytes = (int64_t)strlen(request_json);
    if (prompt_bytes / 4 > 4096) {
        set_error(error, error_size, "the prompt (about %lld tokens) exceeds the context (4096 tokens)",
                  (long long)(prompt_bytes / 4));
        json_free(request);
        return PB_ERR_CONTEXT_LENGTH_EXCEEDED;
    }
    pb_run *run = calloc(1, sizeof *run);
    pthread_mutex_init(&run->lock, NULL);
    pthread_cond_init(&run->wake, NULL);
    run->max_tokens = json_get_int64(request, "max_tokens", 16);
    run->max_wall_ms = json_get_number(request, "max_wall_ms", 0);
    run->prompt_bytes = prompt_bytes;
    run->prefill_ms = (double)prompt_bytes / 20;
    json_free(request);
    *out_run = run;
    return PB_OK;
}

static void emit(const pb_event_sink *sink, pb_event *event) {
    event->struct_size = sizeof *event;
    sink->on_event(sink->context, event);
}

static void finish(const pb_event_sink *sink, pb_finish_reason reason) {
    pb_event event = {.type = PB_EVENT_FINISH, .finish_reason = reason};
#ifdef BROKEN_NO_TERMINAL_AFTER_CANCEL
    /* The bug: a cancelled run just stops, without its terminal event. */
    if (reason == PB_FINISH_CANCELLED) return;
#endif
    emit(sink, &event);
#ifdef BROKEN_TWO_TERMINAL_EVENTS
    /* The bug: the end is announced twice. */
    emit(sink, &event);
#endif
}

static void min_run_execute(pb_run *run, const pb_event_sink *sink) {
#ifdef BROKEN_READS_SINK_PAST_SIZE
    /* The bug: a field of a newer header's sink, read without PB_HAS(sink, max_event_bytes). */
    struct sink_1_2 { pb_event_sink base; uint32_t max_event_bytes; };
    volatile uint32_t max_event_bytes = ((const struct sink_1_2 *)sink)->max_event_bytes;
    (void)max_event_bytes;
#endif
    double start = plugin_now_ms();
    double deadline = run->max_wall_ms > 0 ? start + run->max_wall_ms : 0;
    if (is_cancelled(run)) {
        finish(sink, PB_FINISH_CANCELLED);
        return;
    }
    /* Prompt processing, with progress every 100 ms for a 1.1 host. */
    int host_1_1 = g_host && g_host->abi_minor >= 1;
    for (double done = 0; done < run->prefill_ms;) {
        double slice = run->prefill_ms - done < 100 ? run->prefill_ms - done : 100;
        if (deadline > 0 && start + done + slice > deadline) slice = deadline - start - done;
        if (slice > 0 && sleep_unless_cancelled(run, slice)) {
            finish(sink, PB_FINISH_CANCELLED);
            return;
        }
        if (deadline > 0 && plugin_now_ms() >= deadline) {
            finish(sink, PB_FINISH_TIME_LIMIT);
            return;
        }
        done += slice;
        if (host_1_1) {
            pb_event progress = {.type = PB_EVENT_PROGRESS, .progress_total = run->prompt_bytes / 4,
                                 .progress_processed = (int64_t)(done / run->prefill_ms * (double)(run->prompt_bytes / 4))};
            emit(sink, &progress);
        }
    }
    /* The reply, a word at a time (a word and the space after it: whole characters). */
    int64_t produced = 0;
    const char *word = k_reply;
    pb_finish_reason reason = PB_FINISH_LENGTH;
    while (produced < run->max_tokens) {
        if (sleep_unless_cancelled(run, 5)) {
            reason = PB_FINISH_CANCELLED;
            break;
        }
        if (deadline > 0 && plugin_now_ms() >= deadline) {
            reason = PB_FINISH_TIME_LIMIT;
            break;
        }
        const char *end = strchr(word, ' ');
        size_t length = end ? (size_t)(end - word) + 1 : strlen(word);
        pb_event content = {.type = PB_EVENT_CONTENT_DELTA, .text = word, .text_len = length};
        emit(sink, &content);
        produced++;
        word = end ? end + 1 : k_reply;
    }
    pb_event usage = {.type = PB_EVENT_USAGE, .prompt_tokens = run->prompt_bytes / 4, .completion_tokens = produced};
    emit(sink, &usage);
    finish(sink, reason);
}

static void min_run_cancel(pb_run *run) {
#ifdef BROKEN_BLOCKING_CANCEL
    /* The bug: run_cancel waits (here for 2 s) instead of returning at once. */
    plugin_sleep_ms(2000);
#endif
    pthread_mutex_lock(&run->lock);
    __atomic_store_n(&run->cancelled, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&run->wake);
    pthread_mutex_unlock(&run->lock);
}

static void min_run_destroy(pb_run *run) {
    pthread_cond_destroy(&run->wake);
    pthread_mutex_destroy(&run->lock);
    free(run);
}

static void min_shutdown(void) { g_host = NULL; }

/* ─── The table and the entry point ─────────────────────────────────────── */

static const pb_plugin_api minimal_api = {
    .struct_size = sizeof(pb_plugin_api),
    .abi_major = PB_ABI_VERSION_MAJOR,
    .abi_minor = PB_ABI_VERSION_MINOR,
    .name = "minimal",
    .version = "1.0.0",
    .description = "A minimal chat plugin: the base of the conformance checker's broken fixtures",
    .model_formats = "min",
    .capabilities = PB_CAP_CHAT,
    .load = min_load,
    .model_info = min_model_info,
    .unload = min_unload,
    .run_create = min_run_create,
    .run_execute = min_run_execute,
    .run_cancel = min_run_cancel,
    .run_destroy = min_run_destroy,
    .flags = 0,
    .probe = min_probe,
    .shutdown = min_shutdown,
};

#ifdef BROKEN_EXPORTED_ENGINE_SYMBOL
/* The bug: an engine function left in the dynamic symbol table, where it can clash with
 * another plugin's engine of the same name. */
PB_EXPORT int minimal_engine_decode(int tokens) { return tokens; }
#endif

PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) {
    if (!host || host->abi_major != PB_ABI_VERSION_MAJOR) return NULL;
#ifdef BROKEN_READS_HOST_PAST_SIZE
    /* The bug: a field of a newer header's host table, read without PB_HAS(host, alloc). */
    struct host_1_2 { pb_host_api base; void *(*alloc)(size_t); };
    void *volatile alloc = (void *)((const struct host_1_2 *)host)->alloc;
    (void)alloc;
#endif
    g_host = host;
    return &minimal_api;
}
