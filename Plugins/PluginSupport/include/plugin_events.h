/*
 * plugin_events.h — what every C or C++ plugin needs from the ABI's versioning rule, written
 * once: the entry point (PB_PLUGIN_ENTRY, as SQLite's SQLITE_EXTENSION_INIT), and events and
 * statuses sent in the shape the host's ABI minor understands (patchbay.h, Versioning).
 *
 *     static const pb_plugin_api my_api = { ... };
 *     PB_PLUGIN_ENTRY(my_api, 0, NULL)   // any 1.x host, nothing to start
 *
 *     pb_event e = {0};
 *     e.type = PB_EVENT_FINISH;
 *     e.finish_reason = PB_FINISH_STOP_SEQUENCE;   // a 1.0 host gets PB_FINISH_STOP
 *     plugin_emit(sink, &e);
 */
#ifndef PB_PLUGIN_EVENTS_H
#define PB_PLUGIN_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "patchbay.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The host's table, kept by the entry point; NULL before it ran. Valid until the process ends. */
extern const pb_host_api *plugin_host;

/** The host's ABI minor: what it understands of the events, finishes and codes minors added. */
unsigned plugin_host_minor(void);

/** `status` as the host knows it: to a 1.0 host, a code of 1.1 becomes its nearest 1.0 code. */
pb_status plugin_status_for_host(pb_status status);

/**
 * Delivers `event` through `sink`, downgraded for the host: sets struct_size, and to a 1.0 host
 * drops the event types of 1.1 (progress, segment, language), sends a stop-sequence finish as
 * PB_FINISH_STOP without text, an error code of 1.1 as its 1.0 neighbour and no retry_after_ms.
 * Returns 1 when the event went out, 0 when the host would not know it.
 */
int plugin_emit(const pb_event_sink *sink, pb_event *event);

/** A text event (content, reasoning, segment text); nothing when `length` is 0. */
int plugin_emit_text(const pb_event_sink *sink, pb_event_type type, const char *text, size_t length);
/** The terminal error: `code`, the message, and (for busy, overloaded, timed out) when to retry (0: not said). */
int plugin_emit_error(const pb_event_sink *sink, pb_status code, const char *message, uint32_t retry_after_ms);
/** The terminal finish; `stop` is the matched stop sequence for PB_FINISH_STOP_SEQUENCE, else NULL. */
int plugin_emit_finish(const pb_event_sink *sink, pb_finish_reason reason, const char *stop);

/** A plugin's own start-up, run once a host is accepted: nonzero refuses the host (log why first). */
typedef int (*plugin_start_fn)(const pb_host_api *host);

/**
 * What PB_PLUGIN_ENTRY runs: refuses a host of another major, or one older than
 * 1.`min_minor`, with a line in its log; keeps the host in `plugin_host`; runs `start`
 * (NULL: nothing to start; nonzero: refuse the host) and returns `table`.
 */
const pb_plugin_api *plugin_enter(const pb_host_api *host, const pb_plugin_api *table, unsigned min_minor,
                                  plugin_start_fn start);

#ifdef __cplusplus
}
#define PB_PLUGIN_ENTRY_LINKAGE extern "C"
#else
#define PB_PLUGIN_ENTRY_LINKAGE
#endif

/** Defines the plugin's one exported symbol, pb_plugin_entry, returning `table` (see plugin_enter). */
#define PB_PLUGIN_ENTRY(table, min_minor, start)                                       \
    PB_PLUGIN_ENTRY_LINKAGE PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) { \
        return plugin_enter(host, &(table), (min_minor), (start));                     \
    }

#endif
