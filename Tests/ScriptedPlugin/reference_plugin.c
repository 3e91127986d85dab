/*
 * The Patchbay reference plugin: the whole ABI (1.1), implemented by a
 * deterministic scripted engine that the host's tests, benchmarks and
 * `patchbay plugin check` drive through its settings. It is a test engine, not
 * a template: a plugin author starts from Examples/CPlugin (or the Rust and
 * Swift templates beside it).
 *
 * A "model" is a small text file ending in `.ref` with `key=value` lines:
 *
 *   reply=Hello from the Patchbay reference engine.   words streamed as tokens
 *   repeat=1                 cycle the reply until max_tokens (default 0: stop after it)
 *   token_delay_ms=20        time per generated token (default 0)
 *   prefill_ms=0             simulated prompt processing before the first token
 *   progress_interval_ms=100 how often prompt processing reports PB_EVENT_PROGRESS
 *   load_ms=0                simulated load time, reported as progress
 *   load_bytes=67108864      simulated weight size for load progress (and model_info's size_bytes)
 *   context_length=4096      what model_info reports (max_seq_length in the load request may shrink it)
 *   reasoning=Let me think.  streamed as reasoning when enable_thinking is true
 *   tool_arguments={"city": "Paris"}   arguments of the scripted tool call
 *   stats_file=/tmp/x.stats  if set, the engine writes its produced-token count here
 *   slots=4                  runs the engine decodes at once (model_info's parallel_slots)
 *   busy_when_full=0         1: a run that finds every slot taken fails with PB_ERR_BUSY
 *   advertised_slots=-1      the parallel_slots model_info reports: -1 the real number,
 *                            0 none (the host then queues nothing and the engine says busy)
 *   retry_after_ms=1000      what that busy error tells the client to wait
 *   batching=0               1: one engine thread per model decodes all its runs (see below)
 *   ignore_wall_limit=0      1: ignore the request's max_wall_ms (to test the host's own watchdog)
 *   create_delay_ms=0        run_create takes this long, then logs "run created" (to test that
 *                            the host never frees a model under a run_create in progress)
 *   finish_delay_ms=0        run_execute returns this long after the FINISH event (an engine
 *                            that tidies up after its answer is out)
 *   vision=0                 1: the model accepts images; the reply starts with one token per image
 *   transcript=Hello from the reference transcriber.   what a transcription "hears"
 *   segment_words=4          words per transcription segment
 *   language=en              the language a transcription "detects"
 *
 * Behaviour: a chat request with `tools` (and tool_choice not "none") whose
 * last message is not a tool result gets a tool call of the first (or the
 * forced) tool; otherwise the reply text. Tokens are whitespace-separated
 * words. A vision model prefixes the reply with `[image NAME: TYPE, N bytes] `
 * per image, so a test can see that the raw bytes arrived. A transcription
 * request (kind "transcription") must carry a RIFF/WAVE file; its length sets
 * the segments' timestamps, and `transcript` is what they say.
 *
 * Versioning, both ways (see the top of patchbay.h): this file is compiled
 * against 1.1, but it may be loaded by a 1.0 host. Every event goes out
 * through plugin_emit (Plugins/PluginSupport/plugin_events.h), which keeps
 * what 1.1 added (progress, segment and language events, the stop-sequence
 * finish, busy errors, retry-after) from a 1.0 host; and every struct the host
 * owns is read or written only inside that struct's struct_size (PB_HAS).
 *
 * Threads: without `batching`, a run decodes on the host's thread that called
 * run_execute (the simple way). With `batching=1`, runs are handed to one
 * engine thread per model that produces one token per run per step, the way a
 * continuous-batching engine does. Either way this plugin sets
 * PB_FLAG_BATCHING, so the host's on_event never blocks, and the plugin pauses
 * a run whose client has fallen behind (sink->backlog) instead.
 */
#include "patchbay.h"
#include "json_buffer.h"
#include "json_reader.h"
#include "plugin_events.h"
#include "plugin_util.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Tests compile a second copy under another name (one that claims the same files). */
#ifndef REFERENCE_PLUGIN_NAME
#define REFERENCE_PLUGIN_NAME "reference"
#endif
#ifndef REFERENCE_PROBE_SCORE
#define REFERENCE_PROBE_SCORE 100
#endif

/* Models loaded and not yet unloaded, so shutdown can tell if the host forgot one. */
static int g_live_models;

static char *dup_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *copy = malloc(n);
    if (copy) memcpy(copy, s, n);
    return copy;
}

/* A CLOCK_REALTIME deadline `ms` from now, for pthread_cond_timedwait (portable to macOS). */
static struct timespec deadline_after_ms(double ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    if (ms < 0) ms = 0;
    long long ns = deadline.tv_nsec + (long long)(ms * 1e6);
    deadline.tv_sec += (time_t)(ns / 1000000000LL);
    deadline.tv_nsec = (long)(ns % 1000000000LL);
    return deadline;
}

/* ─── The model ─────────────────────────────────────────────────────────── */

/* The engine thread of a `batching=1` model: it owns no runs, it only visits them. */
typedef struct engine {
    pthread_t thread;
    pthread_mutex_t lock;  /* guards everything below */
    pthread_cond_t wake;   /* signalled when a run joins, is cancelled, or the engine must stop */
    struct pb_run *runs;   /* the batch: runs being decoded, linked through pb_run.next_in_batch */
    int poked;             /* something changed since the engine last looked */
    int stopping;
} engine;

struct pb_model {
    char *path;
    char *reply;
    char *reasoning;
    char *tool_arguments;
    char *stats_file;
    char *transcript;
    char *language;
    int repeat;
    double token_delay_ms;
    double prefill_ms;
    double progress_interval_ms;
    int64_t context_length;
    int64_t training_context_length;
    uint64_t load_bytes;
    int slots;
    int busy_when_full;
    int advertised_slots;
    uint32_t retry_after_ms;
    int batching;
    int ignore_wall_limit;
    int create_delay_ms;
    int finish_delay_ms;
    int vision;
    int segment_words;
    engine *engine;         /* NULL unless batching */
    int64_t produced_total; /* tokens produced by all runs; atomically updated */
    int64_t active_runs;    /* runs executing now (they hold a slot); atomically updated */
    pthread_mutex_t stats_lock;
};

static void set_setting(pb_model *m, const char *key, const char *value) {
    char **text = NULL;
    if (!strcmp(key, "reply")) text = &m->reply;
    else if (!strcmp(key, "reasoning")) text = &m->reasoning;
    else if (!strcmp(key, "tool_arguments")) text = &m->tool_arguments;
    else if (!strcmp(key, "stats_file")) text = &m->stats_file;
    else if (!strcmp(key, "transcript")) text = &m->transcript;
    else if (!strcmp(key, "language")) text = &m->language;
    else if (!strcmp(key, "repeat")) m->repeat = atoi(value);
    else if (!strcmp(key, "token_delay_ms")) m->token_delay_ms = atof(value);
    else if (!strcmp(key, "prefill_ms")) m->prefill_ms = atof(value);
    else if (!strcmp(key, "progress_interval_ms")) m->progress_interval_ms = atof(value);
    else if (!strcmp(key, "context_length")) m->context_length = atoll(value);
    else if (!strcmp(key, "load_bytes")) m->load_bytes = strtoull(value, NULL, 10);
    else if (!strcmp(key, "slots")) m->slots = atoi(value);
    else if (!strcmp(key, "busy_when_full")) m->busy_when_full = atoi(value);
    else if (!strcmp(key, "advertised_slots")) m->advertised_slots = atoi(value);
    else if (!strcmp(key, "retry_after_ms")) m->retry_after_ms = (uint32_t)strtoul(value, NULL, 10);
    else if (!strcmp(key, "batching")) m->batching = atoi(value);
    else if (!strcmp(key, "ignore_wall_limit")) m->ignore_wall_limit = atoi(value);
    else if (!strcmp(key, "create_delay_ms")) m->create_delay_ms = atoi(value);
    else if (!strcmp(key, "finish_delay_ms")) m->finish_delay_ms = atoi(value);
    else if (!strcmp(key, "vision")) m->vision = atoi(value);
    else if (!strcmp(key, "segment_words")) m->segment_words = atoi(value);
    if (text) { free(*text); *text = dup_string(value); }
}

static void engine_stop(pb_model *m);

static void free_model(pb_model *m) {
    if (!m) return;
    engine_stop(m);
    free(m->path); free(m->reply); free(m->reasoning); free(m->tool_arguments); free(m->stats_file);
    free(m->transcript); free(m->language);
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

static void *engine_main(void *arg);

/* Starts the engine thread of a batching model. Returns 0 on failure. */
static int engine_start(pb_model *m) {
    engine *e = calloc(1, sizeof *e);
    if (!e) return 0;
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->wake, NULL);
    m->engine = e;
    if (pthread_create(&e->thread, NULL, engine_main, m) != 0) {
        pthread_cond_destroy(&e->wake);
        pthread_mutex_destroy(&e->lock);
        free(e);
        m->engine = NULL;
        return 0;
    }
    return 1;
}

/* Stops and joins the engine thread. The host unloads only once every run is
 * destroyed, so the batch is empty by then. */
static void engine_stop(pb_model *m) {
    engine *e = m->engine;
    if (!e) return;
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->thread, NULL);
    pthread_cond_destroy(&e->wake);
    pthread_mutex_destroy(&e->lock);
    free(e);
    m->engine = NULL;
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
        int failure = errno;
        plugin_set_error(error, error_size, "cannot open %s: %s", path, strerror(failure));
        json_free(request);
        return failure == ENOENT ? PB_ERR_NOT_FOUND : PB_ERR_LOAD_FAILED;
    }
    pb_model *m = calloc(1, sizeof *m);
    if (!m) {
        fclose(f);
        json_free(request);
        plugin_set_error(error, error_size, "out of memory");
        return PB_ERR_OUT_OF_MEMORY;
    }
    pthread_mutex_init(&m->stats_lock, NULL);
    m->path = dup_string(path);
    m->reply = dup_string("Hello from the Patchbay reference engine.");
    m->reasoning = dup_string("Let me think about this step by step.");
    m->tool_arguments = dup_string("{\"city\": \"Paris\", \"unit\": \"celsius\"}");
    m->transcript = dup_string("Hello from the reference transcriber.");
    m->language = dup_string("en");
    m->context_length = 4096;
    m->load_bytes = 64u << 20;
    m->slots = 4;
    m->advertised_slots = -1;
    m->retry_after_ms = 1000;
    m->progress_interval_ms = 100;
    m->segment_words = 4;
    double load_ms = 0;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *eq = strchr(line, '=');
        if (line[0] == '#' || !eq) continue;
        *eq = '\0';
        if (!strcmp(line, "load_ms")) load_ms = atof(eq + 1);
        else set_setting(m, line, eq + 1);
    }
    fclose(f);
    if (m->slots < 1) m->slots = 1;
    if (m->segment_words < 1) m->segment_words = 1;
    if (m->progress_interval_ms <= 0) m->progress_interval_ms = 100;
    /* The load request may shrink the context, as max_seq_length does for real
     * engines; what the model was trained with stays what the file says. */
    m->training_context_length = m->context_length;
    int64_t max_seq = (int64_t)json_get_number(request, "max_seq_length", 0);
    if (max_seq > 0 && max_seq < m->context_length) m->context_length = max_seq;
    json_free(request);

    /* Simulated loading: report progress every 10 ms; the host may cancel. The
     * callbacks struct is the host's: read `progress` only if it is inside it. */
    int32_t (*progress)(void *, const char *, uint64_t, uint64_t) =
        callbacks && PB_HAS(callbacks, progress) ? callbacks->progress : NULL;
    double start = plugin_now_ms();
    for (;;) {
        double elapsed = plugin_now_ms() - start;
        double fraction = load_ms > 0 ? elapsed / load_ms : 1.0;
        if (fraction > 1.0) fraction = 1.0;
        int done = fraction >= 1.0;
        if (progress && progress(callbacks->context, done ? "ready" : "mmap",
                                 (uint64_t)(fraction * (double)m->load_bytes), m->load_bytes)) {
            plugin_set_error(error, error_size, "load of %s was cancelled", m->path);
            free_model(m);
            return PB_ERR_CANCELLED;
        }
        if (done) break;
        plugin_sleep_ms(10);
    }

    /* A batching engine needs a host whose on_event never blocks (a 1.1 host
     * promises that to a PB_FLAG_BATCHING plugin). A 1.0 host's on_event may
     * block on one slow client, which would stall every run on the shared
     * thread, so with such a host each run decodes on its own thread. */
    if (m->batching && plugin_host_minor() < 1) {
        plugin_log(plugin_host, PB_LOG_WARNING, "%s: batching=1 needs an ABI 1.1 host; decoding each run on its own thread",
                   m->path);
        m->batching = 0;
    }
    if (m->batching && !engine_start(m)) {
        plugin_set_error(error, error_size, "cannot start the engine thread for %s", m->path);
        free_model(m);
        return PB_ERR_LOAD_FAILED;
    }
    write_stats(m);
    __atomic_add_fetch(&g_live_models, 1, __ATOMIC_SEQ_CST);
    plugin_log(plugin_host, PB_LOG_INFO, "loaded %s (context %lld, %d slots%s)", m->path, (long long)m->context_length,
               m->slots, m->batching ? ", batching" : "");
    *out_model = m;
    return PB_OK;
}

static uint64_t model_capabilities(const pb_model *m) {
    uint64_t caps = PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_TOKENIZE | PB_CAP_EMBEDDINGS | PB_CAP_TOOLS |
                    PB_CAP_REASONING | PB_CAP_TRANSCRIPTION;
    if (m->vision) caps |= PB_CAP_VISION_INPUT; /* as a real engine has vision only with a projector */
    return caps;
}

enum { EMBEDDING_DIMENSIONS = 8 };

/* The host zeroed `info` and declared its size: a 1.0 host's info is 24 bytes,
 * and writing a 1.1 field into it would write past the host's struct. */
static void ref_model_info(pb_model *model, pb_model_info *info) {
    if (PB_HAS(info, context_length)) info->context_length = model->context_length;
    if (PB_HAS(info, capabilities)) info->capabilities = model_capabilities(model);
    if (PB_HAS(info, parallel_slots)) info->parallel_slots = model->advertised_slots < 0 ? model->slots : model->advertised_slots;
    if (PB_HAS(info, embedding_dimensions)) info->embedding_dimensions = EMBEDDING_DIMENSIONS;
    if (PB_HAS(info, training_context_length)) info->training_context_length = model->training_context_length;
    if (PB_HAS(info, size_bytes)) info->size_bytes = model->load_bytes;
    if (PB_HAS(info, architecture)) info->architecture = "reference";
}

static void ref_unload(pb_model *model) {
    __atomic_sub_fetch(&g_live_models, 1, __ATOMIC_SEQ_CST);
    /* Logged so that a test can count unloads from the engine's side. */
    plugin_log(plugin_host, PB_LOG_INFO, "unloaded %s", model->path);
    free_model(model);
}

/* [non-blocking] A name test and an open: no reading, so it is cheap enough for an event loop. */
static int32_t ref_probe(const char *model_path, char *detail, size_t detail_size) {
    size_t len = model_path ? strlen(model_path) : 0;
    if (len < 4 || strcasecmp(model_path + len - 4, ".ref") != 0) return 0;
    FILE *f = fopen(model_path, "r");
    if (!f) return 0;
    fclose(f);
    if (detail && detail_size > 0) snprintf(detail, detail_size, "a reference script");
    return REFERENCE_PROBE_SCORE;
}

/* ─── Audio: a bounds-checked RIFF/WAVE reader ─────────────────────────── */

typedef struct {
    unsigned channels;
    unsigned sample_rate;
    unsigned bits_per_sample;
    unsigned byte_rate;
    uint64_t data_bytes; /* what is really present, whatever the header claims */
} wav_info;

static unsigned read_u16(const uint8_t *p) { return (unsigned)p[0] | (unsigned)p[1] << 8; }
static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Reads the format and the length of the audio. The bytes come from a client:
 * every offset is checked against `size` before it is read. */
static pb_status parse_wav(const uint8_t *data, size_t size, wav_info *out, char *error, size_t error_size) {
    memset(out, 0, sizeof *out);
    if (!data || size < 12) {
        if (data && size >= 4 && !memcmp(data, "RIFF", 4))
            plugin_set_error(error, error_size, "truncated WAV header (%zu bytes)", size);
        else
            plugin_set_error(error, error_size, "not a WAV file (RIFF/WAVE)");
        return PB_ERR_INVALID_REQUEST;
    }
    if (memcmp(data, "RIFF", 4) || memcmp(data + 8, "WAVE", 4)) {
        plugin_set_error(error, error_size, "not a WAV file (RIFF/WAVE)");
        return PB_ERR_INVALID_REQUEST;
    }
    int have_fmt = 0, have_data = 0;
    size_t at = 12;
    /* Chunks: a 4-byte id, a 4-byte little-endian size, the body, a pad byte if the size is odd. */
    while (size - at >= 8 && !(have_fmt && have_data)) {
        const uint8_t *chunk = data + at;
        uint64_t body = read_u32(chunk + 4);
        uint64_t present = size - at - 8;
        if (!memcmp(chunk, "fmt ", 4) && !have_fmt) {
            if (body < 16) {
                plugin_set_error(error, error_size, "WAV fmt chunk is too short (%llu bytes)", (unsigned long long)body);
                return PB_ERR_INVALID_REQUEST;
            }
            if (present < 16) {
                plugin_set_error(error, error_size, "truncated WAV fmt chunk");
                return PB_ERR_INVALID_REQUEST;
            }
            out->channels = read_u16(chunk + 10);
            out->sample_rate = read_u32(chunk + 12);
            out->byte_rate = read_u32(chunk + 16);
            out->bits_per_sample = read_u16(chunk + 22);
            have_fmt = 1;
        } else if (!memcmp(chunk, "data", 4) && !have_data) {
            /* Streamed WAVs often claim more (or 0xFFFFFFFF): trust only what arrived. */
            out->data_bytes = body < present ? body : present;
            have_data = 1;
        }
        uint64_t next = (uint64_t)at + 8 + body + (body & 1);
        if (next >= size) break;
        at = (size_t)next;
    }
    if (!have_fmt) {
        plugin_set_error(error, error_size, "WAV file has no fmt chunk");
        return PB_ERR_INVALID_REQUEST;
    }
    if (!have_data) {
        plugin_set_error(error, error_size, "WAV file has no data chunk");
        return PB_ERR_INVALID_REQUEST;
    }
    if (!out->channels || !out->sample_rate || !out->bits_per_sample || !out->byte_rate) {
        plugin_set_error(error, error_size,
                         "WAV fmt chunk is invalid (channels %u, sample rate %u, bits %u, byte rate %u)",
                         out->channels, out->sample_rate, out->bits_per_sample, out->byte_rate);
        return PB_ERR_INVALID_REQUEST;
    }
    return PB_OK;
}

/* ─── Runs ──────────────────────────────────────────────────────────────── */

typedef enum { SCRIPT_REPLY, SCRIPT_TOOL_CALL, SCRIPT_TRANSCRIPTION } script_kind;

/* Where a run is in its script. Each stage yields pieces (tokens, segments, …) one at a time. */
typedef enum {
    STAGE_PREFILL,     /* simulated prompt processing (chat and completion) */
    STAGE_REASONING,   /* reasoning words, when enable_thinking */
    STAGE_TOOL_HEADER, /* the first delta of the tool call: its id and name */
    STAGE_TOOL_ARGS,   /* the call's arguments, in pieces */
    STAGE_IMAGES,      /* one token per image (vision models) */
    STAGE_REPLY,       /* the reply words */
    STAGE_LANGUAGE,    /* transcription: the language */
    STAGE_SEGMENTS,    /* transcription: the segments */
    STAGE_DONE,
} stage;

/* The next thing a run will send, prepared before it is paced and sent. */
typedef struct {
    pb_event_type type;
    const char *text;
    size_t text_len;
    int64_t tokens;     /* tokens it counts as (0: not a token, so not paced either) */
    int tool_header;    /* carries the tool call's id and name */
    int64_t segment_start_ms, segment_end_ms;
} piece;

struct pb_run {
    pb_model *model;
    /* Cancel: written under `lock`, read anywhere with __atomic; `wake` cuts the run's sleeps short. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int cancelled;

    /* The request. */
    script_kind script;
    int think;
    int64_t max_tokens;
    double max_wall_ms; /* 0: none */
    int64_t prompt_tokens;
    char **stops;
    size_t stop_count;
    size_t longest_stop;
    char *tool_name;
    char call_id[32];
    const pb_byte_input **images; /* the host's inputs, valid until run_destroy: no copy */
    size_t image_count;
    char *language;               /* transcription: the request's language, or NULL to "detect" */
    char *request_id;             /* the host's id for the HTTP request, named in the log */
    int64_t audio_ms;
    int64_t segment_count;

    /* Progress through the script. */
    stage stage;
    size_t pos;         /* offset into the text of the stage */
    size_t index;       /* image or segment number */
    int64_t produced;   /* completion tokens so far */
    piece next;
    int has_next;
    json_buffer scratch;  /* text of `next` when the run composes it (images, segments) */
    json_buffer content;  /* with stop sequences: the content so far, */
    size_t content_sent;  /* and how much of it the client has */
    pb_finish_reason finish; /* 0 while the run goes on */
    const char *matched_stop;
    double started, wall_deadline, first_token_at;

    /* Batched execution (only touched by the engine thread while the run is in the batch). */
    const pb_event_sink *sink;
    double prefill_end, next_progress_at, next_token_at;
    struct pb_run *next_in_batch;
    int ended;           /* under `lock`: the terminal event was sent */
    pthread_cond_t done; /* run_execute waits on it for `ended` */
};

static int is_cancelled(pb_run *run) { return __atomic_load_n(&run->cancelled, __ATOMIC_ACQUIRE); }

/* Sleeps up to `ms`, waking at once on cancel. Returns 1 if cancelled. */
static int sleep_unless_cancelled(pb_run *run, double ms) {
    if (ms <= 0) return is_cancelled(run);
    struct timespec deadline = deadline_after_ms(ms);
    pthread_mutex_lock(&run->lock);
    while (!run->cancelled && pthread_cond_timedwait(&run->wake, &run->lock, &deadline) != ETIMEDOUT) {}
    int cancelled = run->cancelled;
    pthread_mutex_unlock(&run->lock);
    return cancelled;
}

static int wall_exceeded(const pb_run *run, double now) { return run->wall_deadline > 0 && now >= run->wall_deadline; }

/* How long a run may sleep before it must look at the wall clock again. */
static double until_wall(const pb_run *run, double now, double ms) {
    if (run->wall_deadline > 0 && run->wall_deadline - now < ms) return run->wall_deadline - now;
    return ms;
}

static int is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

static int64_t count_words(const char *s) {
    int64_t n = 0;
    int in_word = 0;
    for (; s && *s; s++) {
        int space = is_space(*s);
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
    free(run->images);
    free(run->language);
    free(run->request_id);
    jb_free(&run->scratch);
    jb_free(&run->content);
    pthread_cond_destroy(&run->done);
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

/* The byte input called `name`, or NULL. The structs are the host's: a field is
 * read only when it lies inside the struct_size the host declared. */
static const pb_byte_input *find_input(const pb_byte_input *const *inputs, size_t count, const char *name) {
    for (size_t i = 0; name && inputs && i < count; i++) {
        const pb_byte_input *input = inputs[i];
        if (!input || !PB_HAS(input, size) || !input->name) continue;
        if (!strcmp(input->name, name)) return input;
    }
    return NULL;
}

/* Collects the {"type":"image","image":{"input":NAME}} parts of a chat, in order. */
static pb_status collect_images(pb_run *run, const json_value *request, const pb_byte_input *const *inputs,
                                size_t input_count, char *error, size_t error_size) {
    const json_value *messages = json_get(request, "messages");
    for (size_t i = 0; messages && messages->kind == JSON_ARRAY && i < messages->count; i++) {
        const json_value *content = json_get(&messages->items[i], "content");
        for (size_t j = 0; content && content->kind == JSON_ARRAY && j < content->count; j++) {
            const json_value *part = &content->items[j];
            const char *type = json_get_string(part, "type");
            if (!type || strcmp(type, "image") != 0) continue;
            const char *name = json_get_string(json_get(part, "image"), "input");
            if (!name) {
                plugin_set_error(error, error_size, "messages[%zu].content[%zu]: an image part needs image.input", i, j);
                return PB_ERR_INVALID_REQUEST;
            }
            const pb_byte_input *input = find_input(inputs, input_count, name);
            if (!input) {
                plugin_set_error(error, error_size, "messages[%zu].content[%zu]: no byte input named '%s'", i, j, name);
                return PB_ERR_INVALID_REQUEST;
            }
            if (!run->model->vision) {
                plugin_set_error(error, error_size, "this model has no vision (its .ref file does not set vision=1)");
                return PB_ERR_UNSUPPORTED;
            }
            const pb_byte_input **grown = realloc(run->images, (run->image_count + 1) * sizeof *grown);
            if (!grown) {
                plugin_set_error(error, error_size, "out of memory");
                return PB_ERR_OUT_OF_MEMORY;
            }
            run->images = grown;
            run->images[run->image_count++] = input;
        }
    }
    return PB_OK;
}

/* A transcription names its audio; the audio must be a WAV file, whose length sets the timestamps. */
static pb_status prepare_transcription(pb_run *run, const json_value *request, const pb_byte_input *const *inputs,
                                       size_t input_count, char *error, size_t error_size) {
    pb_model *m = run->model;
    run->script = SCRIPT_TRANSCRIPTION;
    run->stage = STAGE_LANGUAGE;
    const char *name = json_get_string(json_get(request, "audio"), "input");
    if (!name) {
        plugin_set_error(error, error_size, "a transcription request needs audio.input");
        return PB_ERR_INVALID_REQUEST;
    }
    const pb_byte_input *audio = find_input(inputs, input_count, name);
    if (!audio) {
        plugin_set_error(error, error_size, "audio: no byte input named '%s'", name);
        return PB_ERR_INVALID_REQUEST;
    }
    wav_info wav;
    pb_status status = parse_wav(audio->data, audio->size, &wav, error, error_size);
    if (status != PB_OK) return status;
    run->audio_ms = (int64_t)(wav.data_bytes * 1000u / wav.byte_rate);
    int64_t words = count_words(m->transcript);
    run->segment_count = (words + m->segment_words - 1) / m->segment_words;
    const char *language = json_get_string(request, "language");
    if (language && language[0]) run->language = dup_string(language);
    return PB_OK;
}

/* [non-blocking] Validates and prepares; the engine does nothing until run_execute. */
static pb_status ref_run_create_with_inputs(pb_model *model, const char *request_json,
                                            const pb_byte_input *const *inputs, size_t input_count,
                                            pb_run **out_run, char *error, size_t error_size) {
    json_value *request = json_parse(request_json);
    if (!request || request->kind != JSON_OBJECT) {
        json_free(request);
        plugin_set_error(error, error_size, "request is not a JSON object");
        return PB_ERR_INVALID_REQUEST;
    }
    pb_run *run = calloc(1, sizeof *run);
    if (!run) {
        json_free(request);
        plugin_set_error(error, error_size, "out of memory");
        return PB_ERR_OUT_OF_MEMORY;
    }
    run->model = model;
    pthread_mutex_init(&run->lock, NULL);
    pthread_cond_init(&run->wake, NULL);
    pthread_cond_init(&run->done, NULL);
    jb_init(&run->scratch);
    jb_init(&run->content);
    run->max_wall_ms = model->ignore_wall_limit ? 0 : json_get_number(request, "max_wall_ms", 0);
    pb_status status = PB_OK;

    const char *request_id = json_get_string(request, "request_id");
    if (request_id) run->request_id = dup_string(request_id);
    const char *kind = json_get_string(request, "kind");
    if (kind && !strcmp(kind, "transcription")) {
        /* A 1.0 host never sends this kind; if one did, it could not take the events. */
        if (plugin_host_minor() < 1) {
            plugin_set_error(error, error_size, "transcription needs an ABI 1.1 host");
            status = PB_ERR_UNSUPPORTED;
        } else {
            status = prepare_transcription(run, request, inputs, input_count, error, error_size);
        }
        json_free(request);
        if (status != PB_OK) { free_run(run); return status; }
        *out_run = run;
        return PB_OK;
    }

    run->stage = STAGE_PREFILL;
    run->max_tokens = json_get_int64(request, "max_tokens", model->context_length); /* clamped: no UB at 2^63 */
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
        for (size_t i = 0; run->stops && i < stop->count; i++) {
            if (stop->items[i].kind != JSON_STRING || !stop->items[i].string[0]) continue;
            run->stops[run->stop_count++] = dup_string(stop->items[i].string);
            size_t len = strlen(stop->items[i].string);
            if (len > run->longest_stop) run->longest_stop = len;
        }
    }
    status = collect_images(run, request, inputs, input_count, error, error_size);
    json_free(request);
    if (status == PB_OK && run->prompt_tokens > model->context_length) {
        plugin_set_error(error, error_size, "request (%lld tokens) exceeds the available context size (%lld tokens)",
                         (long long)run->prompt_tokens, (long long)model->context_length);
        status = PB_ERR_CONTEXT_LENGTH_EXCEEDED;
    }
    if (status != PB_OK) {
        free_run(run);
        return status;
    }
    if (model->create_delay_ms > 0) {
        plugin_sleep_ms(model->create_delay_ms);
        plugin_log(plugin_host, PB_LOG_INFO, "run created on %s", model->path); /* reads the model: it must still exist */
    }
    *out_run = run;
    return PB_OK;
}

/* The 1.0 entry point: a run with no byte inputs. */
static pb_status ref_run_create(pb_model *model, const char *request_json, pb_run **out_run,
                                char *error, size_t error_size) {
    return ref_run_create_with_inputs(model, request_json, NULL, 0, out_run, error, error_size);
}

/* ─── Sending events ───────────────────────────────────────────────────── */
/* Every event goes out through plugin_emit (plugin_events.h): it sets struct_size
 * and gives a 1.0 host only what 1.0 knows. */

/* Sends the content from where the client has it up to `end`. */
static void send_content_up_to(pb_run *run, const pb_event_sink *sink, size_t end) {
    if (end <= run->content_sent) return;
    plugin_emit_text(sink, PB_EVENT_CONTENT_DELTA, run->content.data + run->content_sent, end - run->content_sent);
    run->content_sent = end;
}

/* Prompt processing progress: a 1.1 event, so a 1.0 host gets silence instead (plugin_emit). */
static void emit_progress(pb_run *run, const pb_event_sink *sink, double now) {
    double prefill = run->model->prefill_ms;
    double fraction = prefill > 0 ? (now - run->started) / prefill : 1.0;
    if (fraction > 1.0) fraction = 1.0;
    pb_event e = { 0 };
    e.type = PB_EVENT_PROGRESS;
    e.progress_total = run->prompt_tokens;
    e.progress_processed = (int64_t)((double)run->prompt_tokens * fraction);
    e.progress_cached = 0;
    plugin_emit(sink, &e);
}

/* The end of a run that executed: usage (and timings), then exactly one FINISH. */
static void end_run(pb_run *run, const pb_event_sink *sink, pb_finish_reason finish) {
    pb_model *m = run->model;
    double ended = plugin_now_ms();
    if (!run->first_token_at) run->first_token_at = ended;
    /* Text held back for a stop sequence that never came is the model's, and goes out. */
    if (finish != PB_FINISH_STOP_SEQUENCE && run->stop_count > 0) send_content_up_to(run, sink, run->content.length);
    pb_event usage = { 0 };
    usage.type = PB_EVENT_USAGE;
    usage.prompt_tokens = run->prompt_tokens;
    usage.completion_tokens = run->produced;
    plugin_emit(sink, &usage);
    if (run->script != SCRIPT_TRANSCRIPTION) {
        pb_event timings = { 0 };
        timings.type = PB_EVENT_TIMINGS;
        timings.prompt_ms = run->first_token_at - run->started;
        timings.predicted_ms = ended - run->first_token_at;
        timings.predicted_per_second =
            ended > run->first_token_at ? (double)run->produced * 1000.0 / (ended - run->first_token_at) : 0;
        plugin_emit(sink, &timings);
    }
    /* The slot is free before the client hears the end, so a test that saw the
     * end and reads the stats finds no active run. */
    __atomic_sub_fetch(&m->active_runs, 1, __ATOMIC_SEQ_CST);
    write_stats(m);
    if (run->request_id)
        plugin_log(plugin_host, PB_LOG_INFO, "request %s: run ended, %lld prompt and %lld generated tokens", run->request_id,
                   (long long)run->prompt_tokens, (long long)run->produced);
    /* A 1.0 host gets a stop sequence as PB_FINISH_STOP, without the string (plugin_emit). */
    plugin_emit_finish(sink, finish, finish == PB_FINISH_STOP_SEQUENCE ? run->matched_stop : NULL);
}

/* ─── The script, one piece at a time ──────────────────────────────────── */
/*
 * Both ways of executing (a thread per run, or the batching engine) drive the
 * same script: prepare_next() works out what the run sends next, the caller
 * decides when (pacing, backlog, cancel, wall clock), and send_next() sends
 * it. Keeping "what" apart from "when" is what lets one engine thread
 * interleave many runs.
 */

/* Returns the length of the next word plus its trailing space, starting at *pos (wrapping when `repeat`). */
static size_t next_word(const char *text, size_t *pos, int repeat) {
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

static void set_next(pb_run *run, pb_event_type type, const char *text, size_t len, int64_t tokens) {
    memset(&run->next, 0, sizeof run->next);
    run->next.type = type;
    run->next.text = text;
    run->next.text_len = len;
    run->next.tokens = tokens;
    run->has_next = 1;
}

/* Builds segment `index` of the transcript: its words joined by spaces, with a
 * leading space after the first segment, as Whisper writes them. */
static void compose_segment(pb_run *run) {
    pb_model *m = run->model;
    const char *t = m->transcript;
    jb_clear(&run->scratch);
    if (run->index > 0) jb_append(&run->scratch, " ", 1);
    int64_t words = 0;
    while (words < m->segment_words) {
        while (t[run->pos] && is_space(t[run->pos])) run->pos++;
        if (!t[run->pos]) break;
        size_t start = run->pos;
        while (t[run->pos] && !is_space(t[run->pos])) run->pos++;
        if (words > 0) jb_append(&run->scratch, " ", 1);
        jb_append(&run->scratch, t + start, run->pos - start);
        words++;
    }
    int64_t start_ms = run->audio_ms * (int64_t)run->index / run->segment_count;
    int64_t end_ms = run->audio_ms * (int64_t)(run->index + 1) / run->segment_count;
    set_next(run, PB_EVENT_SEGMENT, run->scratch.data ? run->scratch.data : "", run->scratch.length, words);
    run->next.segment_start_ms = start_ms;
    run->next.segment_end_ms = end_ms;
}

/* Works out the run's next piece into run->next. Returns 0 when the script is
 * over; run->finish then says why. */
static int prepare_next(pb_run *run) {
    pb_model *m = run->model;
    if (run->has_next) return 1;
    if (run->finish) return 0;
    for (;;) {
        switch (run->stage) {
        case STAGE_PREFILL: /* the callers simulate it; here it is already over */
            run->stage = STAGE_REASONING;
            continue;
        case STAGE_REASONING: {
            size_t len = run->think ? next_word(m->reasoning, &run->pos, 0) : 0;
            if (len == 0) {
                run->stage = run->script == SCRIPT_TOOL_CALL ? STAGE_TOOL_HEADER : STAGE_IMAGES;
                run->pos = 0;
                continue;
            }
            if (run->produced >= run->max_tokens) { run->finish = PB_FINISH_LENGTH; return 0; }
            set_next(run, PB_EVENT_REASONING_DELTA, m->reasoning + run->pos - len, len, 1);
            return 1;
        }
        case STAGE_TOOL_HEADER:
            /* The call's id and name come first, then its arguments in pieces, as a real engine streams them. */
            set_next(run, PB_EVENT_TOOL_CALL_DELTA, NULL, 0, 0);
            run->next.tool_header = 1;
            run->stage = STAGE_TOOL_ARGS;
            return 1;
        case STAGE_TOOL_ARGS: {
            const char *args = m->tool_arguments;
            size_t total = strlen(args);
            if (run->pos >= total) { run->finish = PB_FINISH_TOOL_CALLS; run->stage = STAGE_DONE; return 0; }
            size_t end = run->pos + 8 < total ? run->pos + 8 : total;
            while (end < total && ((unsigned char)args[end] & 0xC0) == 0x80) end++; /* never split UTF-8 */
            set_next(run, PB_EVENT_TOOL_CALL_DELTA, args + run->pos, end - run->pos, 1);
            run->pos = end;
            return 1;
        }
        case STAGE_IMAGES: {
            if (run->index >= run->image_count) { run->stage = STAGE_REPLY; run->pos = 0; continue; }
            if (run->produced >= run->max_tokens) { run->finish = PB_FINISH_LENGTH; return 0; }
            const pb_byte_input *image = run->images[run->index++];
            jb_clear(&run->scratch);
            jb_printf(&run->scratch, "[image %s: %s, %zu bytes] ", image->name,
                      image->media_type ? image->media_type : "", image->size);
            set_next(run, PB_EVENT_CONTENT_DELTA, run->scratch.data ? run->scratch.data : "", run->scratch.length, 1);
            return 1;
        }
        case STAGE_REPLY: {
            size_t len = next_word(m->reply, &run->pos, m->repeat);
            if (len == 0) { run->finish = PB_FINISH_STOP; run->stage = STAGE_DONE; return 0; }
            if (run->produced >= run->max_tokens) { run->finish = PB_FINISH_LENGTH; return 0; }
            set_next(run, PB_EVENT_CONTENT_DELTA, m->reply + run->pos - len, len, 1);
            return 1;
        }
        case STAGE_LANGUAGE: {
            const char *language = run->language ? run->language : m->language;
            set_next(run, PB_EVENT_LANGUAGE, language, strlen(language), 0);
            run->stage = STAGE_SEGMENTS;
            run->pos = 0;
            run->index = 0;
            return 1;
        }
        case STAGE_SEGMENTS:
            if ((int64_t)run->index >= run->segment_count) {
                run->finish = PB_FINISH_STOP;
                run->stage = STAGE_DONE;
                return 0;
            }
            compose_segment(run);
            run->index++;
            return 1;
        case STAGE_DONE:
            if (!run->finish) run->finish = PB_FINISH_STOP;
            return 0;
        }
    }
}

/* The longest end of the content so far that some stop sequence starts with. */
static size_t stop_prefix_at_end(const pb_run *run) {
    const char *data = run->content.data;
    size_t len = run->content.length, longest = 0;
    for (size_t i = 0; i < run->stop_count; i++) {
        size_t k = strlen(run->stops[i]) - 1;
        if (k > len) k = len;
        for (; k > longest; k--) {
            if (!memcmp(data + len - k, run->stops[i], k)) { longest = k; break; }
        }
    }
    return longest;
}

/*
 * Sends a piece of content. With stop sequences, text that may be the start of
 * one is held back until the next tokens tell, so that no part of a matched
 * stop string ever reaches the client (a word-sized token may hold only the
 * first letters of a stop). Returns 1 when a stop sequence matched.
 */
static int send_content(pb_run *run, const pb_event_sink *sink, const char *text, size_t len) {
    if (run->stop_count == 0) {
        plugin_emit_text(sink, PB_EVENT_CONTENT_DELTA, text, len);
        return 0;
    }
    size_t before = run->content.length;
    jb_append(&run->content, text, len);
    if (run->content.failed) {
        /* Out of memory: send what is held back and this piece, and stop looking for stops. */
        send_content_up_to(run, sink, before);
        plugin_emit_text(sink, PB_EVENT_CONTENT_DELTA, text, len);
        run->stop_count = 0;
        return 0;
    }
    /* Only a match that ends in the new text is new; it may start in earlier text. */
    size_t from = before + 1 > run->longest_stop ? before + 1 - run->longest_stop : 0;
    const char *first = NULL;
    for (size_t i = 0; i < run->stop_count; i++) {
        const char *hit = strstr(run->content.data + from, run->stops[i]);
        if (hit && (!first || hit < first)) { first = hit; run->matched_stop = run->stops[i]; }
    }
    if (first) {
        send_content_up_to(run, sink, (size_t)(first - run->content.data));
        return 1;
    }
    send_content_up_to(run, sink, run->content.length - stop_prefix_at_end(run));
    return 0;
}

/* Sends run->next. A stop sequence ends the run (run->finish). */
static void send_next(pb_run *run, const pb_event_sink *sink) {
    pb_model *m = run->model;
    piece p = run->next;
    run->has_next = 0;
    if (p.tokens > 0) {
        run->produced += p.tokens;
        __atomic_add_fetch(&m->produced_total, p.tokens, __ATOMIC_SEQ_CST);
        write_stats(m);
    }
    pb_event e = { 0 };
    e.type = p.type;
    e.text = p.text;
    e.text_len = p.text_len;
    switch (p.type) {
    case PB_EVENT_CONTENT_DELTA:
        if (send_content(run, sink, p.text, p.text_len)) { run->finish = PB_FINISH_STOP_SEQUENCE; run->stage = STAGE_DONE; }
        return;
    case PB_EVENT_TOOL_CALL_DELTA:
        if (p.tool_header) {
            e.tool_call_id = run->call_id;
            e.tool_name = run->tool_name;
        }
        break;
    case PB_EVENT_SEGMENT:
        e.segment_start_ms = p.segment_start_ms;
        e.segment_end_ms = p.segment_end_ms;
        break;
    case PB_EVENT_LANGUAGE:
        /* A language the request gave is not a detection: no confidence. */
        e.language_probability = run->language ? 0.0 : 0.9;
        break;
    default:
        break;
    }
    plugin_emit(sink, &e);
}

/* ─── Executing a run on the host's thread ─────────────────────────────── */

/* Whether the host's sink can tell how far behind the client is (a 1.1 sink). */
static int sink_has_backlog(const pb_event_sink *sink) {
    return PB_HAS(sink, backlog_limit) && sink->backlog && sink->backlog_limit > 0;
}

static int backlog_full(const pb_event_sink *sink) {
    return sink_has_backlog(sink) && sink->backlog(sink->context) >= sink->backlog_limit;
}

/* Waits, before a token, until the run's client has room (PB_FLAG_BATCHING:
 * on_event never blocks, so this plugin is the one that must wait), then for
 * the token's time. Returns 0 to go on, or the finish that ends the run. */
static pb_finish_reason pace(pb_run *run, const pb_event_sink *sink, int is_token) {
    if (!is_token) return is_cancelled(run) ? PB_FINISH_CANCELLED : 0;
    while (backlog_full(sink)) {
        if (sleep_unless_cancelled(run, until_wall(run, plugin_now_ms(), 1))) return PB_FINISH_CANCELLED;
        if (wall_exceeded(run, plugin_now_ms())) return PB_FINISH_TIME_LIMIT;
    }
    if (sleep_unless_cancelled(run, until_wall(run, plugin_now_ms(), run->model->token_delay_ms)))
        return PB_FINISH_CANCELLED;
    if (wall_exceeded(run, plugin_now_ms())) return PB_FINISH_TIME_LIMIT;
    return 0;
}

/* Simulated prompt processing, reporting progress as it goes; a cancel cuts it short at once. */
static pb_finish_reason prefill(pb_run *run, const pb_event_sink *sink) {
    pb_model *m = run->model;
    run->stage = STAGE_REASONING;
    if (m->prefill_ms <= 0) return is_cancelled(run) ? PB_FINISH_CANCELLED : 0;
    double end = run->started + m->prefill_ms;
    double next_report = run->started + m->progress_interval_ms;
    for (;;) {
        double now = plugin_now_ms();
        if (now >= end) break;
        double until = (next_report < end ? next_report : end) - now;
        if (sleep_unless_cancelled(run, until_wall(run, now, until))) return PB_FINISH_CANCELLED;
        now = plugin_now_ms();
        if (wall_exceeded(run, now)) return PB_FINISH_TIME_LIMIT;
        if (now >= next_report && now < end) {
            emit_progress(run, sink, now);
            while (next_report <= now) next_report += m->progress_interval_ms;
        }
    }
    emit_progress(run, sink, end);
    return 0;
}

static void execute_here(pb_run *run, const pb_event_sink *sink) {
    pb_finish_reason finish = run->script == SCRIPT_TRANSCRIPTION ? 0 : prefill(run, sink);
    run->first_token_at = plugin_now_ms();
    while (!finish) {
        if (!prepare_next(run)) { finish = run->finish; break; }
        finish = pace(run, sink, run->next.tokens > 0);
        if (finish) break;
        send_next(run, sink);
        finish = run->finish; /* a stop sequence */
    }
    end_run(run, sink, finish);
}

/* ─── The batching engine: one thread, many runs ──────────────────────── */

/* Takes a run out of the batch and wakes its run_execute. The run may be
 * destroyed as soon as `ended` is seen, so nothing touches it afterwards. */
static void leave_batch(pb_run *run, const pb_event_sink *sink, pb_finish_reason finish) {
    engine *e = run->model->engine;
    end_run(run, sink, finish);
    pthread_mutex_lock(&e->lock);
    for (pb_run **link = &e->runs; *link; link = &(*link)->next_in_batch) {
        if (*link == run) { *link = run->next_in_batch; break; }
    }
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_lock(&run->lock);
    run->ended = 1;
    pthread_cond_broadcast(&run->done);
    pthread_mutex_unlock(&run->lock);
}

static double earlier(double a, double b) { return a < b ? a : b; }

/* One visit of the engine to one run: at most one token. Never waits: a run
 * whose client is behind, or whose token is not due, is simply skipped. Returns
 * when the run next needs a visit (0 once it left the batch). */
static double engine_visit(pb_run *run) {
    pb_model *m = run->model;
    const pb_event_sink *sink = run->sink;
    double now = plugin_now_ms();
    if (is_cancelled(run)) { leave_batch(run, sink, PB_FINISH_CANCELLED); return 0; }
    if (wall_exceeded(run, now)) { leave_batch(run, sink, PB_FINISH_TIME_LIMIT); return 0; }
    double wall = run->wall_deadline > 0 ? run->wall_deadline : now + 1000;

    if (run->stage == STAGE_PREFILL) {
        if (now < run->prefill_end) {
            if (now >= run->next_progress_at) {
                emit_progress(run, sink, now);
                while (run->next_progress_at <= now) run->next_progress_at += m->progress_interval_ms;
            }
            return earlier(earlier(run->next_progress_at, run->prefill_end), wall);
        }
        if (m->prefill_ms > 0) emit_progress(run, sink, run->prefill_end);
        run->stage = STAGE_REASONING;
        run->first_token_at = now;
        run->next_token_at = now + m->token_delay_ms;
    }
    /* What is not a token (a language, a tool call's header) goes out at once. */
    for (;;) {
        if (!prepare_next(run)) { leave_batch(run, sink, run->finish); return 0; }
        if (run->next.tokens > 0) break;
        send_next(run, sink);
    }
    if (backlog_full(sink)) return earlier(now + 1, wall); /* look again in 1 ms */
    if (now < run->next_token_at) return earlier(run->next_token_at, wall);
    send_next(run, sink);
    run->next_token_at = now + m->token_delay_ms;
    if (run->finish) { leave_batch(run, sink, run->finish); return 0; }
    return earlier(run->next_token_at, wall);
}

static void *engine_main(void *arg) {
    pb_model *m = arg;
    engine *e = m->engine;
    pb_run **batch = NULL;
    size_t capacity = 0;
    pthread_mutex_lock(&e->lock);
    while (!e->stopping) {
        /* Visit a snapshot, without the lock: sending an event calls into the
         * host, which may call run_cancel, which takes this lock. */
        size_t count = 0;
        for (pb_run *run = e->runs; run; run = run->next_in_batch) count++;
        if (count > capacity) {
            pb_run **grown = realloc(batch, count * sizeof *grown);
            if (grown) { batch = grown; capacity = count; }
        }
        size_t n = 0;
        for (pb_run *run = e->runs; run && n < capacity; run = run->next_in_batch) batch[n++] = run;
        e->poked = 0;
        pthread_mutex_unlock(&e->lock);

        double now = plugin_now_ms();
        double wake_at = now + 1000; /* idle: a joining run or a cancel pokes the engine */
        if (n < count) wake_at = now + 1;  /* out of memory for the snapshot: retry soon */
        for (size_t i = 0; i < n; i++) {
            double next = engine_visit(batch[i]);
            if (next > 0) wake_at = earlier(wake_at, next);
        }

        pthread_mutex_lock(&e->lock);
        if (!e->poked && !e->stopping && wake_at > plugin_now_ms()) {
            struct timespec deadline = deadline_after_ms(wake_at - plugin_now_ms());
            pthread_cond_timedwait(&e->wake, &e->lock, &deadline);
        }
    }
    pthread_mutex_unlock(&e->lock);
    free(batch);
    return NULL;
}

static void poke_engine(engine *e) {
    pthread_mutex_lock(&e->lock);
    e->poked = 1;
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->lock);
}

/* Hands the run to the engine thread and waits until it sent the terminal event. */
static void execute_batched(pb_run *run, const pb_event_sink *sink) {
    engine *e = run->model->engine;
    run->sink = sink; /* valid until run_execute returns, which is after the terminal event */
    run->prefill_end = run->started + (run->script == SCRIPT_TRANSCRIPTION ? 0 : run->model->prefill_ms);
    run->next_progress_at = run->started + run->model->progress_interval_ms;
    if (run->script == SCRIPT_TRANSCRIPTION) {
        run->first_token_at = run->started;
        run->next_token_at = run->started + run->model->token_delay_ms;
    }
    pthread_mutex_lock(&e->lock);
    run->next_in_batch = e->runs;
    e->runs = run;
    e->poked = 1;
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->lock);

    pthread_mutex_lock(&run->lock);
    while (!run->ended) pthread_cond_wait(&run->done, &run->lock);
    pthread_mutex_unlock(&run->lock);
}

/* ─── run_execute, run_cancel, run_destroy ─────────────────────────────── */

/* Takes one of the model's slots. Fails only with busy_when_full and every slot taken. */
static int take_slot(pb_model *m) {
    int64_t busy = __atomic_load_n(&m->active_runs, __ATOMIC_SEQ_CST);
    do {
        if (m->busy_when_full && busy >= m->slots) return 0;
    } while (!__atomic_compare_exchange_n(&m->active_runs, &busy, busy + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return 1;
}

static void ref_run_execute(pb_run *run, const pb_event_sink *sink) {
    pb_model *m = run->model;
    if (!take_slot(m)) {
        char message[128];
        snprintf(message, sizeof message, "all %d slots of the reference engine are busy", m->slots);
        plugin_emit_error(sink, PB_ERR_BUSY, message, m->retry_after_ms); /* a 1.0 host: engine unavailable */
        return;
    }
    write_stats(m);
    run->started = plugin_now_ms();
    run->wall_deadline = run->max_wall_ms > 0 ? run->started + run->max_wall_ms : 0;
    if (m->engine) execute_batched(run, sink);
    else execute_here(run, sink);
    if (m->finish_delay_ms > 0) plugin_sleep_ms(m->finish_delay_ms);
}

static void ref_run_cancel(pb_run *run) {
    pthread_mutex_lock(&run->lock);
    __atomic_store_n(&run->cancelled, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&run->wake);
    pthread_mutex_unlock(&run->lock);
    if (run->model->engine) poke_engine(run->model->engine); /* the engine ends it on its next step, now */
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
    *out_dimensions = EMBEDDING_DIMENSIONS;
    if (out_capacity < EMBEDDING_DIMENSIONS) {
        plugin_set_error(error, error_size, "need room for %d floats", EMBEDDING_DIMENSIONS);
        return PB_ERR_INVALID_REQUEST;
    }
    double acc[EMBEDDING_DIMENSIONS] = { 0 }, norm = 0;
    for (size_t i = 0; i < text_len; i++) acc[(unsigned char)text[i] % EMBEDDING_DIMENSIONS] += 1.0;
    for (int i = 0; i < EMBEDDING_DIMENSIONS; i++) norm += acc[i] * acc[i];
    for (int i = 0; i < EMBEDDING_DIMENSIONS; i++) out[i] = norm > 0 ? (float)(acc[i] / __builtin_sqrt(norm)) : 0.0f;
    return PB_OK;
}

/* Every model is unloaded by now, so no engine thread is left; the host table stays valid. */
static void ref_shutdown(void) {
    int live = __atomic_load_n(&g_live_models, __ATOMIC_SEQ_CST);
    if (live > 0) plugin_log(plugin_host, PB_LOG_WARNING, "shut down with %d models still loaded", live);
    plugin_log(plugin_host, PB_LOG_INFO, "%s plugin shut down", REFERENCE_PLUGIN_NAME);
    plugin_host = NULL;
}

/* ─── The entry point ───────────────────────────────────────────────────── */

static const pb_plugin_api reference_api = {
    .struct_size = sizeof(pb_plugin_api),
    .abi_major = PB_ABI_VERSION_MAJOR,
    .abi_minor = PB_ABI_VERSION_MINOR,
    .name = REFERENCE_PLUGIN_NAME,
    .version = "1.1.0",
    .description = "Deterministic scripted engine for the host's tests, benchmarks and conformance checks",
    .model_formats = "ref",
    /* VISION_INPUT here means "some models can": a model says whether it does in model_info. */
    .capabilities = PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_VISION_INPUT | PB_CAP_TOKENIZE | PB_CAP_EMBEDDINGS |
                    PB_CAP_TOOLS | PB_CAP_REASONING | PB_CAP_TRANSCRIPTION,
    .load = ref_load,
    .model_info = ref_model_info,
    .unload = ref_unload,
    .run_create = ref_run_create,
    .run_execute = ref_run_execute,
    .run_cancel = ref_run_cancel,
    .run_destroy = ref_run_destroy,
    .count_tokens = ref_count_tokens,
    .embed = ref_embed,
    /* ── ABI 1.1 ── */
    .flags = PB_FLAG_BATCHING,
    .probe = ref_probe,
    .run_create_with_inputs = ref_run_create_with_inputs,
    .shutdown = ref_shutdown,
};

/* Any 1.x host (a 1.0 host gets 1.0 events); the host's table is kept in plugin_host. */
PB_PLUGIN_ENTRY(reference_api, 0, NULL)
