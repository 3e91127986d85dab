/*
 * The Patchbay reference plugin: the whole ABI, implemented by a deterministic
 * scripted engine. Copy this file to start a backend of your own.
 *
 * A "model" is a small text file ending in `.ref` with `key=value` lines:
 *
 *   reply=Hello from the Patchbay reference engine.   words streamed as tokens
 *   repeat=1                 cycle the reply until max_tokens (default 0: stop after it)
 *   token_delay_ms=20        time per generated token (default 0)
 *   prefill_ms=0             simulated prompt processing before the first token
 *   load_ms=0                simulated load time, reported as progress
 *   load_bytes=67108864      simulated weight size for load progress
 *   context_length=4096      what model_info reports
 *   reasoning=Let me think.  streamed as reasoning when enable_thinking is true
 *   tool_arguments={"city": "Paris"}   arguments of the scripted tool call
 *   stats_file=/tmp/x.stats  if set, the engine writes its produced-token count here
 *
 * Behaviour: a chat request with `tools` (and tool_choice not "none") whose
 * last message is not a tool result gets a tool call of the first (or the
 * forced) tool; otherwise the reply text. Tokens are whitespace-separated words.
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
#include <sys/stat.h>
#include <time.h>

static const pb_host_api *g_host;

/* ─── The model ─────────────────────────────────────────────────────────── */

struct pb_model {
    char *reply;
    char *reasoning;
    char *tool_arguments;
    char *stats_file;
    int repeat;
    double token_delay_ms;
    double prefill_ms;
    int64_t context_length;
    int64_t produced_total; /* tokens produced by all runs; atomically updated */
    int64_t active_runs;    /* atomically updated */
    pthread_mutex_t stats_lock;
};

static char *dup_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *copy = malloc(n);
    if (copy) memcpy(copy, s, n);
    return copy;
}

static void set_setting(pb_model *m, const char *key, const char *value) {
    if (!strcmp(key, "reply")) { free(m->reply); m->reply = dup_string(value); }
    else if (!strcmp(key, "reasoning")) { free(m->reasoning); m->reasoning = dup_string(value); }
    else if (!strcmp(key, "tool_arguments")) { free(m->tool_arguments); m->tool_arguments = dup_string(value); }
    else if (!strcmp(key, "stats_file")) { free(m->stats_file); m->stats_file = dup_string(value); }
    else if (!strcmp(key, "repeat")) m->repeat = atoi(value);
    else if (!strcmp(key, "token_delay_ms")) m->token_delay_ms = atof(value);
    else if (!strcmp(key, "prefill_ms")) m->prefill_ms = atof(value);
    else if (!strcmp(key, "context_length")) m->context_length = atoll(value);
}

static void free_model(pb_model *m) {
    if (!m) return;
    free(m->reply); free(m->reasoning); free(m->tool_arguments); free(m->stats_file);
    pthread_mutex_destroy(&m->stats_lock);
    free(m);
}

/* Writes the engine's own view of its work, so tests can check that a
 * cancelled generation really stopped without trusting the host. */
static void write_stats(pb_model *m) {
    if (!m->stats_file) return;
    pthread_mutex_lock(&m->stats_lock);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", m->stats_file);
    FILE *f = fopen(tmp, "w");
    if (f) {
        fprintf(f, "produced_tokens=%lld\nactive_runs=%lld\n",
                (long long)__atomic_load_n(&m->produced_total, __ATOMIC_SEQ_CST),
                (long long)__atomic_load_n(&m->active_runs, __ATOMIC_SEQ_CST));
        fclose(f);
        rename(tmp, m->stats_file);
    }
    pthread_mutex_unlock(&m->stats_lock);
}

static pb_status ref_load(const char *request_json, const pb_load_callbacks *callbacks,
                          pb_model **out_model, char *error, size_t error_size) {
    json_value *request = json_parse(request_json);
    const char *path = json_get_string(request, "model_path");
    if (!path) {
        json_free(request);
        plugin_set_error(error, error_size, "load request has no model_path");
        return PB_ERR_INVALID_REQUEST;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        plugin_set_error(error, error_size, "cannot open %s: %s", path, strerror(errno));
        json_free(request);
        return errno == ENOENT ? PB_ERR_NOT_FOUND : PB_ERR_LOAD_FAILED;
    }
    pb_model *m = calloc(1, sizeof *m);
    m->reply = dup_string("Hello from the Patchbay reference engine.");
    m->reasoning = dup_string("Let me think about this step by step.");
    m->tool_arguments = dup_string("{\"city\": \"Paris\", \"unit\": \"celsius\"}");
    m->context_length = 4096;
    pthread_mutex_init(&m->stats_lock, NULL);
    double load_ms = 0;
    uint64_t load_bytes = 64u << 20;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *eq = strchr(line, '=');
        if (line[0] == '#' || !eq) continue;
        *eq = '\0';
        if (!strcmp(line, "load_ms")) load_ms = atof(eq + 1);
        else if (!strcmp(line, "load_bytes")) load_bytes = strtoull(eq + 1, NULL, 10);
        else set_setting(m, line, eq + 1);
    }
    fclose(f);
    /* The load request may shrink the context, as max_seq_length does for real engines. */
    int64_t max_seq = (int64_t)json_get_number(request, "max_seq_length", 0);
    if (max_seq > 0 && max_seq < m->context_length) m->context_length = max_seq;
    json_free(request);

    /* Simulated loading: report progress every 10 ms; the host may cancel. */
    double start = plugin_now_ms();
    for (;;) {
        double elapsed = plugin_now_ms() - start;
        double fraction = load_ms > 0 ? elapsed / load_ms : 1.0;
        if (fraction > 1.0) fraction = 1.0;
        int done = fraction >= 1.0;
        if (callbacks && callbacks->progress &&
            callbacks->progress(callbacks->context, done ? "ready" : "mmap",
                                (uint64_t)(fraction * (double)load_bytes), load_bytes)) {
            free_model(m);
            plugin_set_error(error, error_size, "load of %s was cancelled", path);
            return PB_ERR_CANCELLED;
        }
        if (done) break;
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    write_stats(m);
    plugin_log(g_host, PB_LOG_INFO, "loaded %s (context %lld)", path, (long long)m->context_length);
    *out_model = m;
    return PB_OK;
}

static void ref_model_info(pb_model *model, pb_model_info *info) {
    if (info->struct_size >= offsetof(pb_model_info, context_length) + sizeof info->context_length)
        info->context_length = model->context_length;
    if (info->struct_size >= offsetof(pb_model_info, capabilities) + sizeof info->capabilities)
        info->capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_TOKENIZE | PB_CAP_EMBEDDINGS |
                             PB_CAP_TOOLS | PB_CAP_REASONING;
}

static void ref_unload(pb_model *model) { free_model(model); }

/* ─── Runs ──────────────────────────────────────────────────────────────── */

typedef enum { SCRIPT_REPLY, SCRIPT_TOOL_CALL } script_kind;

struct pb_run {
    pb_model *model;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int cancelled; /* read without the lock with __atomic; written under it */
    script_kind script;
    int think;
    int64_t max_tokens;
    double max_wall_ms;
    int64_t prompt_tokens;
    char **stops;
    size_t stop_count;
    char *tool_name;
    char call_id[32];
};

static int is_cancelled(pb_run *run) { return __atomic_load_n(&run->cancelled, __ATOMIC_ACQUIRE); }

/* Sleeps up to `ms`, waking at once on cancel. Returns 1 if cancelled. */
static int sleep_unless_cancelled(pb_run *run, double ms) {
    if (ms <= 0) return is_cancelled(run);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    long long ns = deadline.tv_nsec + (long long)(ms * 1e6);
    deadline.tv_sec += ns / 1000000000LL;
    deadline.tv_nsec = ns % 1000000000LL;
    pthread_mutex_lock(&run->lock);
    while (!run->cancelled && pthread_cond_timedwait(&run->wake, &run->lock, &deadline) != ETIMEDOUT) {}
    int cancelled = run->cancelled;
    pthread_mutex_unlock(&run->lock);
    return cancelled;
}

static int64_t count_words(const char *s) {
    int64_t n = 0;
    int in_word = 0;
    for (; s && *s; s++) {
        int space = *s == ' ' || *s == '\n' || *s == '\t' || *s == '\r';
        if (!space && !in_word) n++;
        in_word = !space;
    }
    return n;
}

/* Words of every text in the request: the engine's notion of prompt tokens. */
static int64_t count_request_tokens(const json_value *request) {
    int64_t n = count_words(json_get_string(request, "prompt"));
    const json_value *messages = json_get(request, "messages");
    for (size_t i = 0; messages && messages->kind == JSON_ARRAY && i < messages->count; i++) {
        const json_value *content = json_get(&messages->items[i], "content");
        if (content && content->kind == JSON_STRING) n += count_words(content->string);
        for (size_t j = 0; content && content->kind == JSON_ARRAY && j < content->count; j++)
            n += count_words(json_get_string(&content->items[j], "text"));
    }
    return n;
}

static void free_run(pb_run *run) {
    for (size_t i = 0; i < run->stop_count; i++) free(run->stops[i]);
    free(run->stops);
    free(run->tool_name);
    pthread_cond_destroy(&run->wake);
    pthread_mutex_destroy(&run->lock);
    free(run);
}

/* Chooses the scripted tool: a forced tool_choice, else the first tool. NULL = answer in text. */
static const char *pick_tool(const json_value *request) {
    const json_value *tools = json_get(request, "tools");
    if (!tools || tools->kind != JSON_ARRAY || tools->count == 0) return NULL;
    const json_value *choice = json_get(request, "tool_choice");
    if (choice && choice->kind == JSON_STRING && !strcmp(choice->string, "none")) return NULL;
    const json_value *messages = json_get(request, "messages");
    if (messages && messages->kind == JSON_ARRAY && messages->count > 0) {
        const char *last_role = json_get_string(&messages->items[messages->count - 1], "role");
        if (last_role && !strcmp(last_role, "tool")) return NULL; /* answer the tool result */
    }
    const char *forced = json_get_string(json_get(choice, "function"), "name");
    if (forced) return forced;
    return json_get_string(json_get(&tools->items[0], "function"), "name");
}

static pb_status ref_run_create(pb_model *model, const char *request_json, pb_run **out_run,
                                char *error, size_t error_size) {
    json_value *request = json_parse(request_json);
    if (!request || request->kind != JSON_OBJECT) {
        json_free(request);
        plugin_set_error(error, error_size, "request is not a JSON object");
        return PB_ERR_INVALID_REQUEST;
    }
    pb_run *run = calloc(1, sizeof *run);
    run->model = model;
    pthread_mutex_init(&run->lock, NULL);
    pthread_cond_init(&run->wake, NULL);
    run->max_tokens = (int64_t)json_get_number(request, "max_tokens", (double)model->context_length);
    run->max_wall_ms = json_get_number(request, "max_wall_ms", 0);
    run->prompt_tokens = count_request_tokens(request);
    run->think = json_get_bool(json_get(request, "chat_template_kwargs"), "enable_thinking", 0);
    const char *tool = pick_tool(request);
    if (tool) {
        run->script = SCRIPT_TOOL_CALL;
        run->tool_name = dup_string(tool);
        static int64_t next_call = 0;
        snprintf(run->call_id, sizeof run->call_id, "call_ref%lld",
                 (long long)__atomic_add_fetch(&next_call, 1, __ATOMIC_RELAXED));
    }
    const json_value *stop = json_get(request, "stop");
    if (stop && stop->kind == JSON_ARRAY && stop->count > 0) {
        run->stops = calloc(stop->count, sizeof *run->stops);
        for (size_t i = 0; i < stop->count; i++)
            if (stop->items[i].kind == JSON_STRING && stop->items[i].string[0])
                run->stops[run->stop_count++] = dup_string(stop->items[i].string);
    }
    json_free(request);
    if (run->prompt_tokens > model->context_length) {
        plugin_set_error(error, error_size, "request (%lld tokens) exceeds the available context size (%lld tokens)",
                  (long long)run->prompt_tokens, (long long)model->context_length);
        free_run(run);
        return PB_ERR_CONTEXT_LENGTH_EXCEEDED;
    }
    *out_run = run;
    return PB_OK;
}

static void emit(const pb_event_sink *sink, pb_event *event) {
    event->struct_size = sizeof *event;
    sink->on_event(sink->context, event);
}

static void emit_text(const pb_event_sink *sink, pb_event_type type, const char *text, size_t len) {
    pb_event e = { 0 };
    e.type = type;
    e.text = text;
    e.text_len = len;
    emit(sink, &e);
}

/* Returns the length of the next word plus its trailing space, starting at *pos (wrapping when `repeat`). */
static size_t next_token(const char *text, size_t *pos, int repeat) {
    size_t len = strlen(text);
    if (*pos >= len) {
        if (!repeat || len == 0) return 0;
        *pos = 0;
    }
    size_t start = *pos, end = start;
    while (end < len && text[end] == ' ') end++;
    while (end < len && text[end] != ' ') end++;
    if (end < len) end++; /* keep the following space with the word */
    *pos = end;
    return end - start;
}

/* The shared decode loop. Returns the finish reason; appends to `emitted` for stop matching. */
static pb_finish_reason stream_words(pb_run *run, const pb_event_sink *sink, pb_event_type type,
                                     const char *text, int repeat, int64_t *produced, double started,
                                     char **emitted, size_t *emitted_len) {
    pb_model *m = run->model;
    size_t pos = 0, len;
    while ((len = next_token(text, &pos, repeat)) > 0) {
        const char *token = text + pos - len;
        if (*produced >= run->max_tokens) return PB_FINISH_LENGTH;
        if (sleep_unless_cancelled(run, m->token_delay_ms)) return PB_FINISH_CANCELLED;
        if (run->max_wall_ms > 0 && plugin_now_ms() - started >= run->max_wall_ms) return PB_FINISH_TIME_LIMIT;
        (*produced)++;
        __atomic_add_fetch(&m->produced_total, 1, __ATOMIC_SEQ_CST);
        write_stats(m);
        if (type == PB_EVENT_CONTENT_DELTA && run->stop_count > 0) {
            /* Stop sequences: emit only what precedes the first match. */
            char *grown = realloc(*emitted, *emitted_len + len + 1);
            memcpy(grown + *emitted_len, token, len);
            grown[*emitted_len + len] = '\0';
            *emitted = grown;
            for (size_t i = 0; i < run->stop_count; i++) {
                char *hit = strstr(grown, run->stops[i]);
                if (!hit) continue;
                size_t keep = (size_t)(hit - grown);
                if (keep > *emitted_len) emit_text(sink, type, token, keep - *emitted_len);
                return PB_FINISH_STOP;
            }
            *emitted_len += len;
        }
        emit_text(sink, type, token, len);
    }
    return PB_FINISH_STOP;
}

static void ref_run_execute(pb_run *run, const pb_event_sink *sink) {
    pb_model *m = run->model;
    __atomic_add_fetch(&m->active_runs, 1, __ATOMIC_SEQ_CST);
    double started = plugin_now_ms();
    int64_t produced = 0;
    char *emitted = NULL;
    size_t emitted_len = 0;
    pb_finish_reason finish = PB_FINISH_STOP;

    if (sleep_unless_cancelled(run, m->prefill_ms)) finish = PB_FINISH_CANCELLED;
    double first_token = plugin_now_ms();
    if (finish == PB_FINISH_STOP && run->think)
        finish = stream_words(run, sink, PB_EVENT_REASONING_DELTA, m->reasoning, 0, &produced, started,
                              &emitted, &emitted_len);
    if (finish == PB_FINISH_STOP && run->script == SCRIPT_TOOL_CALL) {
        /* The call's arguments arrive in pieces, as a real engine streams them. */
        pb_event e = { 0 };
        e.type = PB_EVENT_TOOL_CALL_DELTA;
        e.tool_call_id = run->call_id;
        e.tool_name = run->tool_name;
        emit(sink, &e);
        const char *args = m->tool_arguments;
        size_t total = strlen(args);
        for (size_t at = 0; at < total && finish == PB_FINISH_STOP; at += 8) {
            if (sleep_unless_cancelled(run, m->token_delay_ms)) { finish = PB_FINISH_CANCELLED; break; }
            pb_event piece = { 0 };
            piece.type = PB_EVENT_TOOL_CALL_DELTA;
            piece.text = args + at;
            piece.text_len = total - at < 8 ? total - at : 8;
            emit(sink, &piece);
            produced++;
        }
        if (finish == PB_FINISH_STOP) finish = PB_FINISH_TOOL_CALLS;
    } else if (finish == PB_FINISH_STOP) {
        finish = stream_words(run, sink, PB_EVENT_CONTENT_DELTA, m->reply, m->repeat, &produced, started,
                              &emitted, &emitted_len);
    }
    free(emitted);

    double ended = plugin_now_ms();
    pb_event usage = { 0 };
    usage.type = PB_EVENT_USAGE;
    usage.prompt_tokens = run->prompt_tokens;
    usage.completion_tokens = produced;
    emit(sink, &usage);
    pb_event timings = { 0 };
    timings.type = PB_EVENT_TIMINGS;
    timings.prompt_ms = first_token - started;
    timings.predicted_ms = ended - first_token;
    timings.predicted_per_second = ended > first_token ? (double)produced * 1000.0 / (ended - first_token) : 0;
    emit(sink, &timings);
    __atomic_sub_fetch(&m->active_runs, 1, __ATOMIC_SEQ_CST);
    write_stats(m);
    pb_event done = { 0 };
    done.type = PB_EVENT_FINISH;
    done.finish_reason = finish;
    emit(sink, &done);
}

static void ref_run_cancel(pb_run *run) {
    pthread_mutex_lock(&run->lock);
    __atomic_store_n(&run->cancelled, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&run->wake);
    pthread_mutex_unlock(&run->lock);
}

static void ref_run_destroy(pb_run *run) { free_run(run); }

/* ─── Optional capabilities ────────────────────────────────────────────── */

static pb_status ref_count_tokens(pb_model *model, const char *request_json, int64_t *out_count,
                                  char *error, size_t error_size) {
    (void)model;
    json_value *request = json_parse(request_json);
    if (!request) {
        plugin_set_error(error, error_size, "request is not valid JSON");
        return PB_ERR_INVALID_REQUEST;
    }
    *out_count = count_request_tokens(request);
    json_free(request);
    return PB_OK;
}

/* A deterministic 8-dimensional bag-of-bytes embedding, L2-normalised. */
static pb_status ref_embed(pb_model *model, const char *text, size_t text_len, float *out,
                           size_t out_capacity, size_t *out_dimensions, char *error, size_t error_size) {
    (void)model;
    enum { DIMENSIONS = 8 };
    *out_dimensions = DIMENSIONS;
    if (out_capacity < DIMENSIONS) {
        plugin_set_error(error, error_size, "need room for %d floats", DIMENSIONS);
        return PB_ERR_INVALID_REQUEST;
    }
    double acc[DIMENSIONS] = { 0 }, norm = 0;
    for (size_t i = 0; i < text_len; i++) acc[(unsigned char)text[i] % DIMENSIONS] += 1.0;
    for (int i = 0; i < DIMENSIONS; i++) norm += acc[i] * acc[i];
    for (int i = 0; i < DIMENSIONS; i++) out[i] = norm > 0 ? (float)(acc[i] / __builtin_sqrt(norm)) : 0.0f;
    return PB_OK;
}

/* ─── The entry point ───────────────────────────────────────────────────── */

static const pb_plugin_api reference_api = {
    .struct_size = sizeof(pb_plugin_api),
    .abi_major = PB_ABI_VERSION_MAJOR,
    .abi_minor = PB_ABI_VERSION_MINOR,
    .name = "reference",
    .version = "1.0.0",
    .description = "Deterministic scripted engine: the template for plugin authors and the engine for host tests",
    .model_formats = "ref",
    .capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_TOKENIZE | PB_CAP_EMBEDDINGS | PB_CAP_TOOLS |
                    PB_CAP_REASONING,
    .load = ref_load,
    .model_info = ref_model_info,
    .unload = ref_unload,
    .run_create = ref_run_create,
    .run_execute = ref_run_execute,
    .run_cancel = ref_run_cancel,
    .run_destroy = ref_run_destroy,
    .count_tokens = ref_count_tokens,
    .embed = ref_embed,
};

PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) {
    if (!host || host->abi_major != PB_ABI_VERSION_MAJOR) return NULL;
    g_host = host;
    return &reference_api;
}
