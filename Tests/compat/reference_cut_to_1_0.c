/*
 * The 1.1 reference plugin, cut down to ABI 1.0: a test that the 1.1 host reads
 * a 1.0 plugin's tables and events only within the sizes a 1.0 plugin declares.
 *
 * A real 1.0 plugin's function table and events are simply shorter than the
 * 1.1 structs. A host that forgets that reads the bytes that follow them: on a
 * real 1.0 plugin that is garbage, usually harmless and so unnoticed. Here
 * every such struct ends exactly at a PROT_NONE guard page, so a single byte
 * read past the 1.0 size crashes the host at once (Tests/e2e/test_abi_compat.py
 * then sees the server die instead of exiting 0 on SIGTERM).
 *
 * What the host sees:
 *  - the table: the reference plugin's, cut to PB_PLUGIN_API_SIZE_1_0 bytes
 *    (no flags, probe, run_create_with_inputs or shutdown), abi_minor 0,
 *    named "reference-cut", in guarded memory;
 *  - every event: struct_size PB_EVENT_SIZE_1_0, in guarded memory.
 * What the wrapped plugin sees: a host table that says minor 0, a 1.0-sized
 * event sink and load callbacks, and a 1.0-sized model_info (all guarded too),
 * so it must also keep to the rules from its side, and sends only 1.0 events.
 *
 * Build it against the 1.1 header, with the .c files of Plugins/PluginSupport:
 *   cc -shared -fPIC -fvisibility=hidden -I Sources/CPatchbayABI/include
 *      -I Plugins/PluginSupport/include Tests/compat/reference_cut_to_1_0.c
 *      Plugins/PluginSupport/json_buffer.c Plugins/PluginSupport/json_reader.c
 *      Plugins/PluginSupport/plugin_events.c Plugins/PluginSupport/plugin_util.c
 *      -o libreference_cut.so -lpthread -lm
 */

/* Include the plugin with its entry point renamed and made static, so that
 * this file's pb_plugin_entry is the only symbol the library exports. */
#include "patchbay.h"
#undef PB_EXPORT
#define PB_EXPORT static
#define pb_plugin_entry reference_entry_1_1
#include "../ScriptedPlugin/reference_plugin.c"
#undef pb_plugin_entry
#undef PB_EXPORT
#define PB_EXPORT __attribute__((visibility("default")))

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A struct placed at the end of a page must stay aligned. */
_Static_assert(PB_PLUGIN_API_SIZE_1_0 % _Alignof(pb_plugin_api) == 0, "table size keeps alignment");
_Static_assert(PB_EVENT_SIZE_1_0 % _Alignof(pb_event) == 0, "event size keeps alignment");
_Static_assert(PB_EVENT_SINK_SIZE_1_0 % _Alignof(pb_event_sink) == 0, "sink size keeps alignment");
_Static_assert(PB_MODEL_INFO_SIZE_1_0 % _Alignof(pb_model_info) == 0, "model info size keeps alignment");
_Static_assert(PB_LOAD_CALLBACKS_SIZE_1_0 % _Alignof(pb_load_callbacks) == 0, "callbacks size keeps alignment");
_Static_assert(PB_HOST_API_SIZE_1_0 % _Alignof(pb_host_api) == 0, "host table size keeps alignment");

/* ─── Guarded memory ────────────────────────────────────────────────────── */

static size_t page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }
static size_t pages_for(size_t size) { return (size + page_size() - 1) / page_size() * page_size(); }

/* Zeroed memory for `size` bytes whose last byte is the last one before a PROT_NONE page. */
static void *guarded_alloc(size_t size) {
    size_t span = pages_for(size);
    char *base = mmap(NULL, span + page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return NULL;
    if (mprotect(base + span, page_size(), PROT_NONE) != 0) {
        munmap(base, span + page_size());
        return NULL;
    }
    return base + span - size;
}

static void guarded_free(void *p, size_t size) {
    if (!p) return;
    size_t span = pages_for(size);
    munmap((char *)p + size - span, span + page_size());
}

/* ─── The wrapped plugin ────────────────────────────────────────────────── */

static const pb_plugin_api *inner; /* the 1.1 reference plugin's own table */
static const pb_host_api *real_host;

/* The capability bits ABI 1.0 defined; a 1.0 plugin sets no others. */
#define CAPABILITIES_1_0 ((uint64_t)PB_CAP_TRANSCRIPTION - 1)

/* The wrapped plugin believes it runs on a 1.0 host, so it must send nothing
 * that 1.0 lacks. If it does, that is a bug in the reference plugin: fail loudly. */
static void check_1_0_event(const pb_event *event) {
    const char *problem = NULL;
    if (event->struct_size < PB_EVENT_SIZE_1_0) problem = "an event smaller than ABI 1.0's";
    else if (event->type < PB_EVENT_CONTENT_DELTA || event->type > PB_EVENT_ERROR) problem = "an event type ABI 1.0 lacks";
    else if (event->type == PB_EVENT_FINISH && (event->finish_reason < PB_FINISH_STOP ||
                                                  event->finish_reason > PB_FINISH_TIME_LIMIT))
        problem = "a finish reason ABI 1.0 lacks";
    else if (event->type == PB_EVENT_ERROR && (event->error_code < PB_ERR_INVALID_REQUEST ||
                                                event->error_code > PB_ERR_INTERNAL))
        problem = "an error code ABI 1.0 lacks";
    if (!problem) return;
    plugin_log(real_host, PB_LOG_ERROR, "reference-cut: the plugin sent a 1.0 host %s (type %d)", problem, event->type);
    abort();
}

typedef struct {
    const pb_event_sink *host_sink;
    pb_event *event; /* PB_EVENT_SIZE_1_0 bytes, guarded */
} cut_sink_context;

/* Hands the host each event as a 1.0 plugin would: a 1.0-sized struct. */
static void forward_event(void *context, const pb_event *event) {
    cut_sink_context *c = context;
    check_1_0_event(event);
    memset(c->event, 0, PB_EVENT_SIZE_1_0);
    memcpy(c->event, event, PB_EVENT_SIZE_1_0);
    c->event->struct_size = PB_EVENT_SIZE_1_0;
    c->host_sink->on_event(c->host_sink->context, c->event);
}

static void cut_run_execute(pb_run *run, const pb_event_sink *sink) {
    pb_event_sink *inner_sink = guarded_alloc(PB_EVENT_SINK_SIZE_1_0);
    pb_event *event = guarded_alloc(PB_EVENT_SIZE_1_0);
    if (!inner_sink || !event) {
        guarded_free(inner_sink, PB_EVENT_SINK_SIZE_1_0);
        guarded_free(event, PB_EVENT_SIZE_1_0);
        pb_event failed = { 0 };
        failed.struct_size = PB_EVENT_SIZE_1_0;
        failed.type = PB_EVENT_ERROR;
        failed.error_code = PB_ERR_OUT_OF_MEMORY;
        failed.text = "reference-cut: cannot map guarded memory";
        failed.text_len = strlen(failed.text);
        sink->on_event(sink->context, &failed);
        return;
    }
    cut_sink_context context = { sink, event };
    /* A 1.0 sink: no backlog function, and nothing readable past on_event. */
    inner_sink->struct_size = PB_EVENT_SINK_SIZE_1_0;
    inner_sink->context = &context;
    inner_sink->on_event = forward_event;
    inner->run_execute(run, inner_sink);
    guarded_free(inner_sink, PB_EVENT_SINK_SIZE_1_0);
    guarded_free(event, PB_EVENT_SIZE_1_0);
}

/* The plugin fills a 1.0-sized model_info (24 bytes): a write past it would fault. */
static void cut_model_info(pb_model *model, pb_model_info *info) {
    pb_model_info *small = guarded_alloc(PB_MODEL_INFO_SIZE_1_0);
    if (!small) return;
    small->struct_size = PB_MODEL_INFO_SIZE_1_0;
    inner->model_info(model, small);
    if (PB_HAS(info, context_length)) info->context_length = small->context_length;
    if (PB_HAS(info, capabilities)) info->capabilities = small->capabilities & CAPABILITIES_1_0;
    guarded_free(small, PB_MODEL_INFO_SIZE_1_0);
}

static pb_status cut_load(const char *request_json, const pb_load_callbacks *callbacks, pb_model **out_model,
                          char *error, size_t error_size) {
    pb_load_callbacks *small = guarded_alloc(PB_LOAD_CALLBACKS_SIZE_1_0);
    if (!small) {
        plugin_set_error(error, error_size, "reference-cut: cannot map guarded memory");
        return PB_ERR_OUT_OF_MEMORY;
    }
    small->struct_size = PB_LOAD_CALLBACKS_SIZE_1_0;
    if (callbacks && PB_HAS(callbacks, progress)) {
        small->context = callbacks->context;
        small->progress = callbacks->progress;
    }
    pb_status status = inner->load(request_json, small, out_model, error, error_size);
    guarded_free(small, PB_LOAD_CALLBACKS_SIZE_1_0);
    return status;
}

static pthread_mutex_t entry_lock = PTHREAD_MUTEX_INITIALIZER;
static pb_plugin_api *cut_table;

PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) {
    if (!host || host->abi_major != PB_ABI_VERSION_MAJOR) return NULL;
    pthread_mutex_lock(&entry_lock);
    if (!cut_table) {
        /* The host as a 1.0 host would present itself. It is kept by the plugin, so it is never freed. */
        pb_host_api *host_1_0 = guarded_alloc(PB_HOST_API_SIZE_1_0);
        pb_plugin_api *table = guarded_alloc(PB_PLUGIN_API_SIZE_1_0);
        if (host_1_0 && table) {
            memcpy(host_1_0, host, host->struct_size < PB_HOST_API_SIZE_1_0 ? host->struct_size : PB_HOST_API_SIZE_1_0);
            host_1_0->struct_size = PB_HOST_API_SIZE_1_0;
            host_1_0->abi_minor = 0;
            real_host = host;
            inner = reference_entry_1_1(host_1_0);
        }
        if (inner) {
            memcpy(table, inner, PB_PLUGIN_API_SIZE_1_0);
            table->struct_size = PB_PLUGIN_API_SIZE_1_0;
            table->abi_minor = 0;
            table->name = "reference-cut";
            table->capabilities &= CAPABILITIES_1_0;
            table->description = "The 1.1 reference plugin cut to ABI 1.0, in guarded memory (a compatibility test)";
            table->load = cut_load;
            table->model_info = cut_model_info;
            table->run_execute = cut_run_execute;
            cut_table = table;
        }
    }
    pthread_mutex_unlock(&entry_lock);
    return cut_table;
}
