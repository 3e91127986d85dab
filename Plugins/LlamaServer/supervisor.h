/*
 * supervisor.h — one model's llama-server child, kept running: started at load
 * and waited for until healthy, found dead, respawned when the next request
 * needs it, stopped at unload. Spawning and reaping are child_process.c's.
 *
 * A child that dies is respawned on a thread of its own; requests wait for it
 * without holding anything up, and stop waiting when their waiter gives up.
 * Children that keep dying soon after they start are left down for a while,
 * longer each time.
 *
 *     supervisor *s = supervisor_create(&child);          // at model creation
 *     supervisor_start(s, callbacks, bytes, err, size);   // load: the first child, healthy
 *     supervisor_ensure_child(s, &waiter, &gen, ...);     // before each request
 *     supervisor_lost_connection(s, gen, why, err, size); // a transfer to child `gen` broke
 *     supervisor_destroy(s);                              // unload: no respawn, child stopped
 *
 * supervisor_start comes once, before the others; supervisor_ensure_child and
 * supervisor_lost_connection may then be called from any thread at once;
 * supervisor_destroy is the last call, when no other is under way.
 */
#ifndef PB_LLAMA_SUPERVISOR_H
#define PB_LLAMA_SUPERVISOR_H

#include <stddef.h>
#include <stdint.h>

#include "launch.h"
#include "patchbay.h"

/**
 * How a child is started. The pointers are the model's: they must outlive the
 * supervisor, and are read each time a child starts (not at supervisor_create),
 * so they may be filled in between.
 */
typedef struct supervised_child {
    const launch_config *config; /* the command line (launch_build_argv), model_path, load_timeout_s */
    const char *socket_path;     /* where the child serves; removed before each start */
    const char *log_path;        /* the child's stdout and stderr; its end goes to Patchbay's log on failure */
    const char *api_key;         /* LLAMA_API_KEY in the child's environment */
} supervised_child;

typedef struct supervisor supervisor;

/** A supervisor with no child yet; NULL when out of memory. `child` is copied. */
supervisor *supervisor_create(const supervised_child *child);

/**
 * The load: starts the first child and waits until it is healthy, reporting
 * progress through `callbacks` (may be NULL) from its resident memory against
 * `model_bytes`. PB_OK, or an error with `error` filled (the child's log then
 * in Patchbay's log). Blocks for as long as llama-server loads.
 */
pb_status supervisor_start(supervisor *supervisor, const pb_load_callbacks *callbacks, uint64_t model_bytes,
                           char *error, size_t error_size);

/** Who waits for a respawn, and for how long. */
typedef struct child_waiter {
    int (*gives_up)(void *context); /* asked while waiting (no lock held): non-zero stops (a cancel) */
    void *context;
    double deadline_ms;             /* plugin_now_ms() clock; 0: as long as the respawn takes */
} child_waiter;

/**
 * Makes sure the child runs, respawning it if it died, and says which child it
 * is (`*generation`, for supervisor_lost_connection). While a respawn runs this
 * waits for it, until it ends, or `waiter` gives up (PB_ERR_CANCELLED) or runs
 * out of time (PB_ERR_OVERLOADED, `*retry_after_ms`). While children keep dying
 * young: PB_ERR_ENGINE_UNAVAILABLE with `*retry_after_ms`. A failed respawn, an
 * unload under way: PB_ERR_ENGINE_UNAVAILABLE. `*retry_after_ms` is 0 unless said.
 */
pb_status supervisor_ensure_child(supervisor *supervisor, const child_waiter *waiter, uint64_t *generation,
                                  uint32_t *retry_after_ms, char *error, size_t error_size);

/**
 * Why a transfer to child `generation` broke, into `out`: the child died (noticed
 * here if it was not yet, and restarted on the next supervisor_ensure_child), or
 * `transfer_error`, something else on the way.
 */
void supervisor_lost_connection(supervisor *supervisor, uint64_t generation, const char *transfer_error, char *out,
                                size_t size);

/**
 * The unload: no more respawns, one under way gives up (at its next health poll)
 * and is waited for, the child is stopped (SIGTERM, then SIGKILL after 3 s).
 */
void supervisor_destroy(supervisor *supervisor);

#endif
