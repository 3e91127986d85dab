#include "plugin_events.h"
#include "plugin_util.h"

#include <string.h>

const pb_host_api *plugin_host;

unsigned plugin_host_minor(void) { return plugin_host ? plugin_host->abi_minor : 0; }

/* Built against the 1.0 header (Tests/compat), a plugin has nothing of 1.1 to downgrade. */
#if PB_ABI_VERSION_MINOR >= 1
pb_status plugin_status_for_host(pb_status status) {
    if (plugin_host_minor() >= 1) return status;
    switch (status) {
    case PB_ERR_BUSY:
    case PB_ERR_OVERLOADED:
    case PB_ERR_TIMED_OUT:
        return PB_ERR_ENGINE_UNAVAILABLE;
    default:
        return status;
    }
}
#else
pb_status plugin_status_for_host(pb_status status) { return status; }
#endif

int plugin_emit(const pb_event_sink *sink, pb_event *event) {
    event->struct_size = sizeof *event;
#if PB_ABI_VERSION_MINOR >= 1
    if (plugin_host_minor() < 1) {
        switch (event->type) {
        case PB_EVENT_PROGRESS:
        case PB_EVENT_SEGMENT:
        case PB_EVENT_LANGUAGE:
            return 0;
        case PB_EVENT_ERROR:
            event->error_code = plugin_status_for_host(event->error_code);
            event->retry_after_ms = 0;
            break;
        case PB_EVENT_FINISH:
            if (event->finish_reason == PB_FINISH_STOP_SEQUENCE) {
                event->finish_reason = PB_FINISH_STOP; /* a 1.0 finish carries no text */
                event->text = NULL;
                event->text_len = 0;
            }
            break;
        default:
            break;
        }
    }
#endif
    sink->on_event(sink->context, event);
    return 1;
}

int plugin_emit_text(const pb_event_sink *sink, pb_event_type type, const char *text, size_t length) {
    if (length == 0) return 0;
    pb_event event = {0};
    event.type = type;
    event.text = text;
    event.text_len = length;
    return plugin_emit(sink, &event);
}

int plugin_emit_error(const pb_event_sink *sink, pb_status code, const char *message, uint32_t retry_after_ms) {
    pb_event event = {0};
    event.type = PB_EVENT_ERROR;
    event.error_code = code;
    event.text = message;
    event.text_len = message ? strlen(message) : 0;
#if PB_ABI_VERSION_MINOR >= 1
    event.retry_after_ms = retry_after_ms;
#else
    (void)retry_after_ms;
#endif
    return plugin_emit(sink, &event);
}

int plugin_emit_finish(const pb_event_sink *sink, pb_finish_reason reason, const char *stop) {
    pb_event event = {0};
    event.type = PB_EVENT_FINISH;
    event.finish_reason = reason;
    event.text = stop;
    event.text_len = stop ? strlen(stop) : 0;
    return plugin_emit(sink, &event);
}

const pb_plugin_api *plugin_enter(const pb_host_api *host, const pb_plugin_api *table, unsigned min_minor,
                                  plugin_start_fn start) {
    /* Only struct_size, abi_major and abi_minor are fixed across majors: nothing else is read first. */
    if (!host || host->abi_major != PB_ABI_VERSION_MAJOR) return NULL;
    if (host->abi_minor < min_minor) {
        plugin_log(host, PB_LOG_ERROR, "%s needs a host of ABI %u.%u or later (this host speaks %u.%u)", table->name,
                   (unsigned)PB_ABI_VERSION_MAJOR, min_minor, (unsigned)host->abi_major, (unsigned)host->abi_minor);
        return NULL;
    }
    plugin_host = host;
    if (start && start(host) != 0) return NULL;
    return table;
}
