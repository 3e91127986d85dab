/*
 * The llama-server backend: one llama.cpp `llama-server` child per loaded
 * model, driven over HTTP through libcurl.
 *
 * Load spawns the child serving on a Unix socket in the model's 0700 work
 * directory (no TCP port: nobody else can reach it), with a random API key in
 * its filtered environment besides; waits for /health while it reports
 * progress from the child's resident memory, then reads /props and /v1/models.
 * A run streams /v1/chat/completions (or /v1/completions) and turns each SSE
 * chunk into ABI events. A cancel closes the connection, which is how
 * llama-server learns to stop; every request has a connection of its own.
 *
 * A child that dies is respawned on a thread of its own when the next request
 * needs it; requests wait for it without holding anything up, and stop waiting
 * at their cancel. Children that keep dying soon after they start are left
 * down for a while, longer each time (supervisor.c).
 *
 * Files: launch.c (the load request, the command line), supervisor.c (the
 * child kept running: started, found dead, respawned, stopped), child_process.c
 * (spawning and reaping children), upstream.c (HTTP), request.c (a request
 * into llama-server's body), sse.c (its streamed reply into events),
 * errors.c (its errors into statuses), gguf.c (probe, metadata); the ABI's
 * versioning (events for the host's minor, the entry point) is the shared
 * plugin_events.c. This file: the models, the runs and the table.
 */
#define _GNU_SOURCE
#include "patchbay.h"
#include "child_process.h"
#include "errors.h"
#include "gguf.h"
#include "json_buffer.h"
#include "json_reader.h"
#include "launch.h"
#include "plugin_events.h"
#include "plugin_util.h"
#include "request.h"
#include "sse.h"
#include "supervisor.h"
#include "upstream.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define PLUGIN_VERSION "1.1.0"
/* Tokenizing and embedding one text: seconds at most, unless the engine is stuck. */
#define POST_TIMEOUT_MS 60000
#define SOCKET_NAME "llama-server.sock"

/* ─── The model: one child ─────────────────────────────────────────────── */

struct pb_model {
    launch_config config;
    char work_dir[PATH_MAX]; /* 0700: the child's socket, its log and the template override */
    char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char log_path[PATH_MAX + 32];
    char api_key[65];
    uint64_t model_bytes;
    supervisor *child;       /* the llama-server child, kept running (supervisor.h) */

    /* What the child and the file say about the model (model_info). */
    int64_t context_length;
    uint64_t capabilities;
    int32_t parallel_slots;
    int64_t embedding_dimensions;
    int64_t training_context_length;
    int64_t parameter_count;
    uint64_t size_bytes;
};

/* 32 bytes from the kernel as hex; 0 when it has none to give: never a zero or partial key. */
static int random_key(char out[65]) {
    unsigned char bytes[32];
    size_t filled = 0;
    while (filled < sizeof bytes) {
        ssize_t n = getrandom(bytes + filled, sizeof bytes - filled, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        filled += (size_t)n;
    }
    for (size_t i = 0; i < sizeof bytes; i++) snprintf(out + 2 * i, 3, "%02x", bytes[i]);
    explicit_bzero(bytes, sizeof bytes);
    return 1;
}

/*
 * The work directory, 0700 (mkdtemp), under $TMPDIR unless the socket's path
 * would not fit a sockaddr_un there; and the paths inside it.
 */
static int make_work_dir(pb_model *model) {
    const char *tmp = getenv("TMPDIR");
    int fits = tmp && *tmp && strlen(tmp) + sizeof "/patchbay-llama-XXXXXX/" SOCKET_NAME <= sizeof model->socket_path;
    snprintf(model->work_dir, sizeof model->work_dir, "%s/patchbay-llama-XXXXXX", fits ? tmp : "/tmp");
    if (!mkdtemp(model->work_dir)) return 0;
    snprintf(model->socket_path, sizeof model->socket_path, "%s/" SOCKET_NAME, model->work_dir);
    snprintf(model->log_path, sizeof model->log_path, "%s/llama-server.log", model->work_dir);
    return 1;
}

static void url_for(const char *path, char *out, size_t size) { snprintf(out, size, UPSTREAM_BASE_URL "%s", path); }

/* ─── Load and unload ──────────────────────────────────────────────────── */

/* GET of one of the child's JSON endpoints at load; NULL (and a warning) when it fails. */
static json_value *get_json(pb_model *model, const char *path) {
    char url[128], error[128];
    url_for(path, url, sizeof url);
    json_buffer reply;
    jb_init(&reply);
    json_value *parsed = NULL;
    long status = upstream_request(model->socket_path, url, model->api_key, NULL, 10000, &reply, NULL, error,
                                   sizeof error);
    if (status == 200) parsed = json_parse(reply.data);
    if (!parsed) plugin_log(plugin_host, PB_LOG_WARNING, "could not read %s from llama-server: %s", path,
                            status ? "an unreadable reply" : error);
    jb_free(&reply);
    return parsed;
}

/*
 * Reads what the child knows about its model. /props: context size, slots,
 * template capabilities, modalities. /v1/models, data[0].meta
 * (server-context.cpp, get_res_model_info): n_ctx_train, n_embd, n_params,
 * and size, llama_model_size: the bytes of the model's tensors over all its
 * split files, without the projector's, which is added here.
 */
static void read_model_facts(pb_model *model) {
    /* An embedding server does nothing else. */
    model->capabilities = model->config.pooling ? PB_CAP_EMBEDDINGS | PB_CAP_TOKENIZE
                                                : PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_TOKENIZE | PB_CAP_REASONING;
    json_value *props = get_json(model, "/props");
    const json_value *settings = json_get(props, "default_generation_settings");
    model->context_length = json_get_int64(settings, "n_ctx", json_get_int64(props, "n_ctx", 0));
    model->parallel_slots = (int32_t)json_get_int64(props, "total_slots", model->config.parallel);
    if (props && !model->config.pooling) {
        if (json_get_bool(json_get(props, "chat_template_caps"), "supports_tools", 0)) model->capabilities |= PB_CAP_TOOLS;
        if (json_get_bool(json_get(props, "modalities"), "vision", 0)) model->capabilities |= PB_CAP_VISION_INPUT;
    }
    json_free(props);

    json_value *models = get_json(model, "/v1/models");
    const json_value *data = json_get(models, "data");
    const json_value *meta = data && data->kind == JSON_ARRAY && data->count > 0 ? json_get(&data->items[0], "meta") : NULL;
    model->training_context_length = json_get_int64(meta, "n_ctx_train", model->config.training_context);
    model->parameter_count = json_get_int64(meta, "n_params", 0);
    /* n_embd is the model's width; it is the embedding's length only where the model embeds. */
    if (model->config.pooling) model->embedding_dimensions = json_get_int64(meta, "n_embd", 0);
    int64_t size = json_get_int64(meta, "size", 0);
    if (size > 0) {
        struct stat st;
        model->size_bytes = (uint64_t)size;
        if (model->config.mmproj_path && stat(model->config.mmproj_path, &st) == 0) model->size_bytes += (uint64_t)st.st_size;
    } else {
        model->size_bytes = model->model_bytes;
    }
    json_free(models);
}

/* What the operator may wonder about later: the context chosen, and the projector. */
static void log_launch_choices(const pb_model *model) {
    const launch_config *c = &model->config;
    plugin_log(plugin_host, PB_LOG_INFO, "context for %s: %lld tokens (training context %lld)", c->model_path,
               (long long)c->context_size, (long long)c->training_context);
    if (c->mmproj_path) {
        plugin_log(plugin_host, PB_LOG_INFO, "vision projector for %s: %s", c->model_path, c->mmproj_path);
    } else if (c->unmatched_projectors) {
        plugin_log(plugin_host, PB_LOG_INFO, "no vision projector for %s: none of the %d beside it matches its name; "
                   "'mmproj_path' chooses one", c->model_path, c->unmatched_projectors);
    }
}

static pb_model *model_new(void) {
    pb_model *model = calloc(1, sizeof *model);
    if (!model) return NULL;
    /* The supervisor reads these when a child starts: prepare_model fills them first. */
    supervised_child child = {.config = &model->config, .socket_path = model->socket_path,
                              .log_path = model->log_path, .api_key = model->api_key};
    model->child = supervisor_create(&child);
    if (!model->child) {
        free(model);
        return NULL;
    }
    return model;
}

static void model_free(pb_model *model) {
    supervisor_destroy(model->child); /* no respawn, no child left */
    if (*model->socket_path) unlink(model->socket_path);
    if (*model->log_path) unlink(model->log_path);
    if (model->config.template_path) unlink(model->config.template_path);
    if (*model->work_dir) rmdir(model->work_dir);
    launch_config_free(&model->config);
    explicit_bzero(model->api_key, sizeof model->api_key);
    free(model);
}

/* The model's key, work directory and configuration. */
static pb_status prepare_model(pb_model *model, const char *request_json, char *error, size_t error_size) {
    if (!random_key(model->api_key)) {
        plugin_set_error(error, error_size, "No random bytes for the child's API key (getrandom: %s).", strerror(errno));
        return PB_ERR_INTERNAL;
    }
    if (!make_work_dir(model)) {
        plugin_set_error(error, error_size, "Could not create a work directory: %s", strerror(errno));
        return PB_ERR_INTERNAL;
    }
    json_value *request = json_parse(request_json);
    if (!request) {
        plugin_set_error(error, error_size, "The load request is not valid JSON.");
        return PB_ERR_INVALID_REQUEST;
    }
    pb_status status = launch_parse_request(request, model->work_dir, &model->config, error, error_size);
    json_free(request);
    if (status != PB_OK) return status;
    struct stat st;
    model->model_bytes = stat(model->config.model_path, &st) == 0 ? (uint64_t)st.st_size : 0;
    if (model->config.mmproj_path && stat(model->config.mmproj_path, &st) == 0) model->model_bytes += (uint64_t)st.st_size;
    log_launch_choices(model);
    return PB_OK;
}

static pb_status llama_load(const char *request_json, const pb_load_callbacks *host_callbacks, pb_model **out_model,
                            char *error, size_t error_size) {
    /* The callbacks are read only within the size the host declared. */
    const pb_load_callbacks *callbacks =
        host_callbacks && PB_HAS(host_callbacks, progress) && host_callbacks->progress ? host_callbacks : NULL;
    pb_model *model = model_new();
    if (!model) {
        plugin_set_error(error, error_size, "Out of memory.");
        return PB_ERR_OUT_OF_MEMORY;
    }
    pb_status status = prepare_model(model, request_json, error, error_size);
    if (status == PB_OK) status = supervisor_start(model->child, callbacks, model->model_bytes, error, error_size);
    if (status != PB_OK) {
        model_free(model);
        return status;
    }
    read_model_facts(model);
    if (callbacks) callbacks->progress(callbacks->context, "ready", model->model_bytes, model->model_bytes);
    *out_model = model;
    return PB_OK;
}

/* Writes only the fields inside the host's struct_size: a 1.0 host's struct ends at capabilities. */
static void llama_model_info(pb_model *model, pb_model_info *info) {
    if (PB_HAS(info, context_length)) info->context_length = model->context_length;
    if (PB_HAS(info, capabilities)) info->capabilities = model->capabilities;
    if (PB_HAS(info, parallel_slots)) info->parallel_slots = model->parallel_slots;
    if (PB_HAS(info, embedding_dimensions)) info->embedding_dimensions = model->embedding_dimensions;
    if (PB_HAS(info, training_context_length)) info->training_context_length = model->training_context_length;
    if (PB_HAS(info, parameter_count)) info->parameter_count = model->parameter_count;
    if (PB_HAS(info, size_bytes)) info->size_bytes = model->size_bytes;
    if (PB_HAS(info, architecture)) info->architecture = model->config.architecture;
}

static void llama_unload(pb_model *model) {
    plugin_log(plugin_host, PB_LOG_INFO, "stopping llama-server for %s", model->config.model_path);
    model_free(model);
}

/* ─── Runs ─────────────────────────────────────────────────────────────── */

/* While a run has no output yet, a progress event at least every second (patchbay.h, run_execute):
 * ticks come every UPSTREAM_TICK_MS, so a heartbeat goes out once this long has passed silently. */
#define HEARTBEAT_MS (1000 - UPSTREAM_TICK_MS)

struct pb_run {
    pb_model *model;
    upstream_stream *stream;
    char *body;
    int is_completion;
    int64_t max_tokens;
    int64_t max_wall_ms;    /* 0: no budget */
    uint64_t generation;    /* the child it talks to (supervisor_ensure_child) */
    char *request_id;       /* the host's HTTP request id, for the log; NULL if none */

    /* Set during run_execute. */
    const pb_event_sink *sink;
    sse_reader reader;
    json_buffer error_body; /* the body of a non-200 reply */
    double started_ms;
    double last_event_ms;
    int out_of_time;        /* the run's deadline closed the stream */
    int ended;              /* a terminal event was delivered */
};

static const char *finish_name(pb_finish_reason reason) {
    switch (reason) {
    case PB_FINISH_STOP: return "stop";
    case PB_FINISH_LENGTH: return "length";
    case PB_FINISH_TOOL_CALLS: return "tool_calls";
    case PB_FINISH_CANCELLED: return "cancelled";
    case PB_FINISH_TIME_LIMIT: return "time_limit";
    case PB_FINISH_STOP_SEQUENCE: return "stop_sequence";
    }
    return "unknown";
}

/* One line per run that names the host's request id, so the host's access line and this
 * plugin's lines for the same request can be found together. */
static void log_run_end(const pb_run *run, const pb_event *terminal) {
    if (!run->request_id) return;
    double took = plugin_now_ms() - run->started_ms;
    if (terminal->type == PB_EVENT_ERROR)
        plugin_log(plugin_host, PB_LOG_INFO, "request %s: run ended with an error after %.0f ms: %.*s", run->request_id,
                   took, (int)terminal->text_len, terminal->text ? terminal->text : "");
    else
        plugin_log(plugin_host, PB_LOG_INFO, "request %s: run ended (%s) after %.0f ms", run->request_id,
                   finish_name(terminal->finish_reason), took);
}

/* Every event goes out here, in the shape the host's ABI minor understands (plugin_emit). */
static void emit(pb_run *run, pb_event *event) {
    if (!plugin_emit(run->sink, event)) return; /* a 1.0 host has no such event (progress) */
    run->last_event_ms = plugin_now_ms();
    if (event->type == PB_EVENT_FINISH || event->type == PB_EVENT_ERROR) {
        run->ended = 1;
        log_run_end(run, event);
    }
}

static void emit_for_reader(void *context, pb_event *event) { emit(context, event); }

static void emit_error(pb_run *run, pb_status code, const char *message, uint32_t retry_after_ms) {
    pb_event event = {.type = PB_EVENT_ERROR, .error_code = code, .text = message, .text_len = strlen(message),
                      .retry_after_ms = retry_after_ms};
    emit(run, &event);
}

static void emit_finish(pb_run *run, pb_finish_reason reason, const char *text) {
    pb_event event = {.type = PB_EVENT_FINISH, .finish_reason = reason, .text = text, .text_len = text ? strlen(text) : 0};
    emit(run, &event);
}

static int on_stream_data(void *context, long http_status, const char *bytes, size_t length) {
    pb_run *run = context;
    if (http_status != 200) {
        jb_append(&run->error_body, bytes, length);
        return run->error_body.length > 65536; /* enough to explain */
    }
    return sse_reader_feed(&run->reader, bytes, length);
}

/*
 * Between deliveries. The deadline: llama-server's t_max_predict_ms counts from
 * the first token and acts only at a newline, so a long prefill or a line
 * without end would outlast max_wall_ms; the run's own clock holds it. The
 * heartbeat: while the prompt is processed or the request waits for a slot,
 * llama-server may say nothing for longer than a second (a slow prompt batch,
 * all slots busy); the host keeps its client's connection alive on progress.
 */
static int on_stream_tick(void *context) {
    pb_run *run = context;
    double now = plugin_now_ms();
    if (run->max_wall_ms > 0 && now - run->started_ms >= (double)run->max_wall_ms) {
        run->out_of_time = 1;
        return 1;
    }
    if (!run->reader.output_started && now - run->last_event_ms >= HEARTBEAT_MS) {
        pb_event event = run->reader.has_progress ? run->reader.progress : (pb_event){.type = PB_EVENT_PROGRESS};
        emit(run, &event);
    }
    return 0;
}

/* While the run waits for a respawn: a cancel stops the wait, and so do its deadline and heartbeats (on_stream_tick). */
static int run_gives_up(void *context) {
    pb_run *run = context;
    return upstream_stream_cancelled(run->stream) || on_stream_tick(run);
}

/*
 * A normalized request (see patchbay.h), and whether it is a raw completion;
 * NULL with `*status` and `error` filled if it is malformed or of a kind this
 * plugin does not serve (a transcription).
 */
static json_value *parse_generation_request(const char *request_json, int *is_completion, pb_status *status,
                                            char *error, size_t error_size) {
    json_value *request = json_parse(request_json);
    if (!request) {
        plugin_set_error(error, error_size, "The request is not valid JSON.");
        *status = PB_ERR_INVALID_REQUEST;
        return NULL;
    }
    const char *kind = json_get_string(request, "kind");
    if (kind && strcmp(kind, "chat") != 0 && strcmp(kind, "completion") != 0) {
        plugin_set_error(error, error_size, "llama-server does not serve requests of kind '%s'.", kind);
        json_free(request);
        *status = PB_ERR_UNSUPPORTED;
        return NULL;
    }
    *is_completion = kind && strcmp(kind, "completion") == 0;
    *status = PB_OK;
    return request;
}

static pb_status llama_run_create_with_inputs(pb_model *model, const char *request_json,
                                              const pb_byte_input *const *inputs, size_t input_count,
                                              pb_run **out_run, char *error, size_t error_size) {
    int is_completion;
    pb_status status;
    json_value *request = parse_generation_request(request_json, &is_completion, &status, error, error_size);
    if (!request) return status;
    char *body = request_build_body(request, is_completion, inputs, inputs ? input_count : 0, &status, error,
                                    error_size);
    int64_t max_tokens = request_max_tokens(request);
    int64_t max_wall_ms = json_get_int64(request, "max_wall_ms", 0);
    const char *request_id = json_get_string(request, "request_id");
    char *request_id_copy = request_id ? strdup(request_id) : NULL;
    json_free(request);
    if (!body) {
        free(request_id_copy);
        return status;
    }
    pb_run *run = calloc(1, sizeof *run);
    upstream_stream *stream = run ? upstream_stream_create() : NULL;
    if (!stream) {
        plugin_set_error(error, error_size, "Out of memory.");
        free(run);
        free(body);
        free(request_id_copy);
        return PB_ERR_OUT_OF_MEMORY;
    }
    run->model = model;
    run->request_id = request_id_copy;
    run->stream = stream;
    run->body = body;
    run->is_completion = is_completion;
    run->max_tokens = max_tokens;
    run->max_wall_ms = max_wall_ms > 0 ? max_wall_ms : 0;
    sse_reader_init(&run->reader, is_completion, emit_for_reader, run);
    jb_init(&run->error_body);
    *out_run = run;
    return PB_OK;
}

static pb_status llama_run_create(pb_model *model, const char *request_json, pb_run **out_run, char *error,
                                  size_t error_size) {
    return llama_run_create_with_inputs(model, request_json, NULL, 0, out_run, error, error_size);
}

static void llama_run_execute(pb_run *run, const pb_event_sink *sink) {
    if (!sink || !PB_HAS(sink, on_event) || !sink->on_event) return; /* nowhere to deliver anything */
    run->sink = sink;
    run->started_ms = run->last_event_ms = plugin_now_ms();
    if (upstream_stream_cancelled(run->stream)) {
        emit_finish(run, PB_FINISH_CANCELLED, NULL);
        return;
    }
    char message[2048];
    uint32_t retry_after_ms;
    child_waiter waiter = {.gives_up = run_gives_up, .context = run};
    pb_status status = supervisor_ensure_child(run->model->child, &waiter, &run->generation, &retry_after_ms, message,
                                               sizeof message);
    if (status == PB_ERR_CANCELLED) {
        emit_finish(run, run->out_of_time ? PB_FINISH_TIME_LIMIT : PB_FINISH_CANCELLED, NULL);
        return;
    }
    if (status != PB_OK) {
        emit_error(run, status, message, retry_after_ms);
        return;
    }
    char url[128];
    url_for(run->is_completion ? "/v1/completions" : "/v1/chat/completions", url, sizeof url);
    plugin_log(plugin_host, PB_LOG_DEBUG, "request %s: POST %s %s", run->request_id ? run->request_id : "-", url, run->body);
    long http_status = 0;
    char transfer_error[256] = "";
    upstream_result result = upstream_stream_run(run->stream, run->model->socket_path, url, run->model->api_key,
                                                 run->body, on_stream_data, on_stream_tick, run, &http_status,
                                                 transfer_error, sizeof transfer_error);
    if (run->ended) return; /* an error arrived in the stream */
    switch (result) {
    case UPSTREAM_CANCELLED:
        emit_finish(run, PB_FINISH_CANCELLED, NULL);
        return;
    case UPSTREAM_TIMED_OUT:
        plugin_set_error(message, sizeof message, "llama-server did not answer in time (%s).", transfer_error);
        emit_error(run, PB_ERR_TIMED_OUT, message, DEFAULT_RETRY_AFTER_MS);
        return;
    case UPSTREAM_FAILED:
        supervisor_lost_connection(run->model->child, run->generation, transfer_error, message, sizeof message);
        emit_error(run, PB_ERR_ENGINE_UNAVAILABLE, message, 0);
        return;
    case UPSTREAM_ABORTED:
        if (run->out_of_time) {
            emit_finish(run, PB_FINISH_TIME_LIMIT, NULL);
            return;
        }
        if (run->reader.pending.failed) {
            emit_error(run, PB_ERR_OUT_OF_MEMORY, "Out of memory while reading llama-server's reply.", 0);
            return;
        }
        break; /* a non-200 reply long enough to explain itself */
    case UPSTREAM_COMPLETED:
        break;
    }
    if (http_status != 200) {
        status = map_upstream_error(http_status, run->error_body.data, upstream_stream_retry_after_ms(run->stream),
                                    message, sizeof message, &retry_after_ms);
        emit_error(run, status, message, retry_after_ms);
        return;
    }
    if (run->reader.has_timings) emit(run, &run->reader.timings);
    const char *stop_sequence;
    pb_finish_reason finish = sse_reader_finish(&run->reader, run->max_tokens, run->max_wall_ms > 0, &stop_sequence);
    emit_finish(run, finish, stop_sequence);
}

static void llama_run_cancel(pb_run *run) { upstream_stream_cancel(run->stream); }

static void llama_run_destroy(pb_run *run) {
    upstream_stream_destroy(run->stream);
    sse_reader_free(&run->reader);
    jb_free(&run->error_body);
    free(run->body);
    free(run->request_id);
    free(run);
}

/* ─── Token counting: the chat template renders, the tokenizer counts ──── */

static pb_status post_json(pb_model *model, const char *path, const char *body, json_value **out, char *error,
                           size_t error_size) {
    char url[128];
    uint64_t generation;
    uint32_t retry_after_ms; /* these calls return only a status: the host chooses when to retry */
    child_waiter waiter = {.deadline_ms = plugin_now_ms() + POST_TIMEOUT_MS};
    pb_status status = supervisor_ensure_child(model->child, &waiter, &generation, &retry_after_ms, error, error_size);
    if (status != PB_OK) return plugin_status_for_host(status);
    url_for(path, url, sizeof url);
    json_buffer reply;
    jb_init(&reply);
    char transfer_error[256];
    upstream_reply_info info;
    long http_status = upstream_request(model->socket_path, url, model->api_key, body, POST_TIMEOUT_MS, &reply, &info,
                                        transfer_error, sizeof transfer_error);
    if (http_status == 0 && info.timed_out) {
        plugin_set_error(error, error_size, "llama-server did not answer %s within %d s.", path, POST_TIMEOUT_MS / 1000);
        status = PB_ERR_TIMED_OUT;
    } else if (http_status == 0) {
        supervisor_lost_connection(model->child, generation, transfer_error, error, error_size);
        status = PB_ERR_ENGINE_UNAVAILABLE;
    } else if (http_status != 200) {
        status = map_upstream_error(http_status, reply.data, info.retry_after_ms, error, error_size, &retry_after_ms);
    } else if (!(*out = json_parse(reply.data))) {
        plugin_set_error(error, error_size, "llama-server sent an unreadable reply to %s.", path);
        status = PB_ERR_INTERNAL;
    }
    jb_free(&reply);
    return plugin_status_for_host(status);
}

static pb_status llama_count_tokens(pb_model *model, const char *request_json, int64_t *out_count, char *error,
                                    size_t error_size) {
    int is_completion;
    pb_status status;
    json_value *request = parse_generation_request(request_json, &is_completion, &status, error, error_size);
    if (!request) return status;
    json_buffer b;
    jb_init(&b);
    json_value *rendered = NULL;
    const char *prompt = json_get_string(request, "prompt");
    if (!is_completion) {
        /* The prompt exactly as generation would see it: the chat template with messages and tools. */
        jb_append_str(&b, "{");
        jb_key(&b, "messages");
        jb_append_json_value(&b, json_get(request, "messages"));
        const json_value *tools = json_get(request, "tools");
        if (tools && tools->kind == JSON_ARRAY) {
            jb_key(&b, "tools");
            jb_append_json_value(&b, tools);
        }
        const json_value *kwargs = json_get(request, "chat_template_kwargs");
        if (kwargs && kwargs->kind == JSON_OBJECT) {
            jb_key(&b, "chat_template_kwargs");
            jb_append_json_value(&b, kwargs);
        }
        jb_append_str(&b, "}");
        status = post_json(model, "/apply-template", b.data, &rendered, error, error_size);
        prompt = json_get_string(rendered, "prompt");
    }
    json_value *tokens = NULL;
    if (status == PB_OK) {
        jb_clear(&b);
        jb_append_str(&b, "{\"content\":");
        jb_append_json_string(&b, prompt ? prompt : "");
        /* A rendered template already carries its special tokens as text. */
        jb_append_str(&b, is_completion ? ",\"add_special\":true}" : ",\"add_special\":false,\"parse_special\":true}");
        status = post_json(model, "/tokenize", b.data, &tokens, error, error_size);
    }
    if (status == PB_OK) {
        const json_value *list = json_get(tokens, "tokens");
        *out_count = list && list->kind == JSON_ARRAY ? (int64_t)list->count : 0;
    }
    json_free(tokens);
    json_free(rendered);
    json_free(request);
    jb_free(&b);
    return status;
}

/* ─── Embeddings (a model loaded with "embedding": true) ────────────────── */

static pb_status llama_embed(pb_model *model, const char *text, size_t text_len, float *out, size_t out_capacity,
                             size_t *out_dimensions, char *error, size_t error_size) {
    char *input = strndup(text, text_len);
    json_buffer b;
    jb_init(&b);
    jb_append_str(&b, "{\"input\":");
    jb_append_json_string(&b, input);
    jb_append_str(&b, "}");
    free(input);
    json_value *reply = NULL;
    pb_status status = post_json(model, "/v1/embeddings", b.data, &reply, error, error_size);
    jb_free(&b);
    if (status != PB_OK) return status;
    const json_value *data = json_get(reply, "data");
    const json_value *vector = data && data->kind == JSON_ARRAY && data->count > 0 ? json_get(&data->items[0], "embedding") : NULL;
    if (!vector || vector->kind != JSON_ARRAY) {
        plugin_set_error(error, error_size, "llama-server sent no embedding.");
        json_free(reply);
        return PB_ERR_INTERNAL;
    }
    *out_dimensions = vector->count;
    if (vector->count > out_capacity) {
        plugin_set_error(error, error_size, "need room for %zu floats", vector->count);
        json_free(reply);
        return PB_ERR_INVALID_REQUEST;
    }
    for (size_t i = 0; i < vector->count; i++) out[i] = (float)vector->items[i].number;
    json_free(reply);
    return PB_OK;
}

/* ─── Probe and shutdown ───────────────────────────────────────────────── */

/* GGUF is the one format llama-server loads: the magic is the whole answer (gguf.c). */
static int32_t llama_probe(const char *model_path, char *detail, size_t detail_size) {
    return gguf_probe(model_path, detail, detail_size);
}

static int g_curl_ready;
static atomic_int g_shut_down;

static void init_curl(void) { g_curl_ready = upstream_global_init(); }

/* After every model was unloaded: no child, no transfer is left, so libcurl's global state can go. */
static void llama_shutdown(void) {
    if (atomic_exchange(&g_shut_down, 1)) return;
    if (g_curl_ready) upstream_global_cleanup();
    g_curl_ready = 0;
    child_spawner_shutdown();
}

/* ─── The table ────────────────────────────────────────────────────────── */

static const pb_plugin_api llama_server_api = {
    .struct_size = sizeof(pb_plugin_api),
    .abi_major = PB_ABI_VERSION_MAJOR,
    .abi_minor = PB_ABI_VERSION_MINOR,
    .name = "llama-server",
    .version = PLUGIN_VERSION,
    .description = "llama.cpp's llama-server, one child process per model, over HTTP",
    .model_formats = "gguf",
    .capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_VISION_INPUT | PB_CAP_TOKENIZE | PB_CAP_TOOLS |
                    PB_CAP_REASONING | PB_CAP_EMBEDDINGS,
    .load = llama_load,
    .model_info = llama_model_info,
    .unload = llama_unload,
    .run_create = llama_run_create,
    .run_execute = llama_run_execute,
    .run_cancel = llama_run_cancel,
    .run_destroy = llama_run_destroy,
    .count_tokens = llama_count_tokens,
    .embed = llama_embed,
    .flags = 0, /* one transfer per run, each on the host's thread: on_event may block */
    .probe = llama_probe,
    .run_create_with_inputs = llama_run_create_with_inputs,
    .shutdown = llama_shutdown,
};

/* Once a host is accepted: libcurl's global state, once per process; without it, no host. */
static int start(const pb_host_api *host) {
    static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
    pthread_once(&curl_once, init_curl);
    if (!g_curl_ready) {
        plugin_log(host, PB_LOG_ERROR, "libcurl could not be initialised");
        return 1;
    }
    return 0;
}

PB_PLUGIN_ENTRY(llama_server_api, 0, start)
