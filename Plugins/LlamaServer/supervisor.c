#define _GNU_SOURCE
#include "supervisor.h"
#include "child_process.h"
#include "errors.h"
#include "json_buffer.h"
#include "plugin_events.h"
#include "plugin_util.h"
#include "upstream.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How much of the child's log goes to Patchbay's log when it fails. */
#define LOG_TAIL_BYTES 2000
/* A child that failed to start has nothing to save: no long grace before SIGKILL. */
#define FAILED_START_GRACE_MS 200
/* How long a child being unloaded has to exit before SIGKILL. */
#define UNLOAD_GRACE_MS 3000
/* How often a wait for a respawn asks its caller whether it gives up (a cancel). */
#define RESPAWN_POLL_MS 100
/* A child that dies within STABLE_UPTIME_MS of coming up (or never comes up) dies young; after
 * QUICK_DEATHS_BEFORE_BACKOFF such deaths in a row it is not respawned for BACKOFF_BASE_MS,
 * doubling each time up to BACKOFF_MAX_MS. One that lived longer starts the count again. */
#define STABLE_UPTIME_MS 60000
#define QUICK_DEATHS_BEFORE_BACKOFF 3
#define BACKOFF_BASE_MS 5000.0
#define BACKOFF_MAX_MS 300000.0

typedef enum { CHILD_DOWN, CHILD_STARTING, CHILD_UP } child_state;

struct supervisor {
    supervised_child child;
    atomic_int closing;      /* unload began: no respawn, and one under way gives up */

    /* `lock` is held only briefly: nobody waits for a child to start while holding it. */
    pthread_mutex_t lock;
    pthread_cond_t changed;  /* `state` changed */
    child_state state;
    pid_t pid;               /* CHILD_UP: the child */
    uint64_t generation;     /* counts the children that came up */
    double up_since_ms;      /* when the child came up; 0 once it died */
    char last_exit[96];      /* how the last child ended: "signal 9 (Killed)" */
    /* Respawns, each on a thread of its own (respawn_main). */
    pthread_t respawner;
    int has_respawner;       /* one to join: running, or ended */
    uint64_t respawns;       /* counts them */
    uint64_t failed_respawn; /* the last one that failed, and why */
    char respawn_failure[256];
    /* Children that keep dying young (note_death). */
    int quick_deaths, backoffs;
    double refuse_until_ms;
};

supervisor *supervisor_create(const supervised_child *child) {
    supervisor *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->child = *child;
    pthread_mutex_init(&s->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC); /* wait_changed's clock */
    pthread_cond_init(&s->changed, &attr);
    pthread_condattr_destroy(&attr);
    return s;
}

void supervisor_destroy(supervisor *s) {
    atomic_store(&s->closing, 1);
    /* A respawn under way sees `closing` at its next health poll and stops its child. */
    if (s->has_respawner) pthread_join(s->respawner, NULL);
    if (s->pid > 0) child_stop(s->pid, UNLOAD_GRACE_MS);
    pthread_cond_destroy(&s->changed);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* ─── Starting a child ─────────────────────────────────────────────────── */

/* The end of the child's log, line by line, into Patchbay's log: for the operator, not the client. */
static void log_child_tail(const supervisor *s) {
    char *tail = file_tail(s->child.log_path, LOG_TAIL_BYTES);
    char *save = NULL;
    for (char *line = strtok_r(tail, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        plugin_log(plugin_host, PB_LOG_WARNING, "llama-server: %s", line);
    free(tail);
}

/* A short summary for the client in `error`; the child's own words go to Patchbay's log. */
static void describe_child_failure(const supervisor *s, const char *what, char *error, size_t error_size) {
    plugin_set_error(error, error_size, "%s. The end of its log is in Patchbay's log.", what);
    plugin_log(plugin_host, PB_LOG_WARNING, "%s (%s); the end of its log:", what, s->child.config->model_path);
    log_child_tail(s);
}

/* Load progress: the child's resident memory against the weights' size, never going backwards. Non-zero: cancelled. */
static int report_progress(uint64_t total, pid_t pid, const pb_load_callbacks *callbacks, uint64_t *high_water) {
    uint64_t rss = child_resident_bytes(pid);
    if (rss > *high_water) *high_water = rss;
    uint64_t loaded = *high_water < total ? *high_water : total - total / 100;
    return callbacks->progress(callbacks->context, "mmap", loaded, total);
}

/*
 * Polls the child's /health until it answers, it exits, its time is up, the
 * load is cancelled (through `callbacks`; NULL on a respawn) or the model is
 * unloaded.
 */
static pb_status wait_healthy(supervisor *s, pid_t pid, const pb_load_callbacks *callbacks, uint64_t model_bytes,
                              char *error, size_t error_size) {
    const char *url = UPSTREAM_BASE_URL "/health";
    json_buffer reply;
    jb_init(&reply);
    double deadline = plugin_now_ms() + s->child.config->load_timeout_s * 1000.0;
    uint64_t high_water = 0;
    pb_status status = PB_ERR_LOAD_FAILED;
    for (;;) {
        int wait_status;
        char what[160], probe_error[128];
        if (child_exited(pid, &wait_status)) {
            char how[96];
            child_describe_exit(wait_status, how, sizeof how);
            snprintf(what, sizeof what, "llama-server exited during load (%s)", how);
            describe_child_failure(s, what, error, error_size);
            break;
        }
        if (upstream_request(s->child.socket_path, url, NULL, NULL, 1000, &reply, NULL, probe_error,
                             sizeof probe_error) == 200) {
            status = PB_OK;
            break;
        }
        if (atomic_load(&s->closing)) {
            plugin_set_error(error, error_size, "The model was unloaded while llama-server started.");
            status = PB_ERR_CANCELLED;
            break;
        }
        if (callbacks && report_progress(model_bytes, pid, callbacks, &high_water) != 0) {
            plugin_set_error(error, error_size, "The load was cancelled.");
            status = PB_ERR_CANCELLED;
            break;
        }
        if (plugin_now_ms() > deadline) {
            snprintf(what, sizeof what, "llama-server did not become ready within %d s",
                     s->child.config->load_timeout_s);
            describe_child_failure(s, what, error, error_size);
            break;
        }
        plugin_sleep_ms(50);
    }
    jb_free(&reply);
    return status;
}

/*
 * Starts a child on the model's socket and waits until it is healthy
 * (wait_healthy); `*out_pid` is the child then. Never called with s->lock
 * held: this may take minutes.
 */
static pb_status start_child(supervisor *s, const pb_load_callbacks *callbacks, uint64_t model_bytes, pid_t *out_pid,
                             char *error, size_t error_size) {
    unlink(s->child.socket_path); /* a dead child's: llama-server would not bind over it */
    char **argv = launch_build_argv(s->child.config, s->child.socket_path);
    char key_env[96];
    snprintf(key_env, sizeof key_env, "LLAMA_API_KEY=%s", s->child.api_key);
    char *extra_env[] = {key_env, NULL};
    char spawn_error[256] = "out of memory";
    pid_t pid = argv ? child_spawn(argv, extra_env, s->child.log_path, spawn_error, sizeof spawn_error) : -1;
    launch_free_argv(argv);
    explicit_bzero(key_env, sizeof key_env);
    if (pid < 0) {
        plugin_set_error(error, error_size, "Could not start llama-server: %s", spawn_error);
        return PB_ERR_LOAD_FAILED;
    }
    plugin_log(plugin_host, PB_LOG_INFO, "started llama-server pid %d on %s for %s", (int)pid, s->child.socket_path,
               s->child.config->model_path);
    pb_status status = wait_healthy(s, pid, callbacks, model_bytes, error, error_size);
    if (status == PB_OK) *out_pid = pid;
    else child_stop(pid, FAILED_START_GRACE_MS);
    return status;
}

/* ─── The child's life: up, dead, respawned ───────────────────────────── */

/* Under s->lock. */
static void child_came_up(supervisor *s, pid_t pid) {
    s->state = CHILD_UP;
    s->pid = pid;
    s->generation++;
    s->up_since_ms = plugin_now_ms();
    pthread_cond_broadcast(&s->changed);
}

pb_status supervisor_start(supervisor *s, const pb_load_callbacks *callbacks, uint64_t model_bytes, char *error,
                           size_t error_size) {
    pid_t pid = 0;
    pb_status status = start_child(s, callbacks, model_bytes, &pid, error, error_size);
    if (status != PB_OK) return status;
    pthread_mutex_lock(&s->lock);
    child_came_up(s, pid);
    pthread_mutex_unlock(&s->lock);
    return PB_OK;
}

/*
 * Counts a child that died, `young` or not; after QUICK_DEATHS_BEFORE_BACKOFF
 * young deaths in a row, no respawn until refuse_until_ms. Under s->lock.
 */
static void note_death(supervisor *s, int young) {
    if (!young) s->quick_deaths = s->backoffs = 0;
    if (++s->quick_deaths < QUICK_DEATHS_BEFORE_BACKOFF) return;
    double wait_ms = BACKOFF_BASE_MS;
    for (int i = 0; i < s->backoffs && wait_ms < BACKOFF_MAX_MS; i++) wait_ms *= 2;
    if (wait_ms > BACKOFF_MAX_MS) wait_ms = BACKOFF_MAX_MS;
    s->refuse_until_ms = plugin_now_ms() + wait_ms;
    s->backoffs++;
    plugin_log(plugin_host, PB_LOG_WARNING, "llama-server for %s died %d times in a row soon after starting; "
               "not restarting it for %.0f s", s->child.config->model_path, s->quick_deaths, wait_ms / 1000);
}

/* The child was found dead (a crash, an OOM kill, kill -9). Under s->lock. */
static void child_died(supervisor *s, int wait_status) {
    child_describe_exit(wait_status, s->last_exit, sizeof s->last_exit);
    plugin_log(plugin_host, PB_LOG_WARNING, "llama-server pid %d exited (%s); the end of its log:", (int)s->pid,
               s->last_exit);
    log_child_tail(s);
    int young = plugin_now_ms() - s->up_since_ms < STABLE_UPTIME_MS;
    s->state = CHILD_DOWN;
    s->pid = 0;
    s->up_since_ms = 0;
    note_death(s, young);
    pthread_cond_broadcast(&s->changed);
}

static void *respawn_main(void *context) {
    supervisor *s = context;
    pid_t pid = 0;
    char error[sizeof s->respawn_failure] = "";
    pb_status status = start_child(s, NULL, 0, &pid, error, sizeof error);
    pthread_mutex_lock(&s->lock);
    if (status == PB_OK) {
        child_came_up(s, pid);
    } else {
        s->state = CHILD_DOWN;
        s->failed_respawn = s->respawns;
        snprintf(s->respawn_failure, sizeof s->respawn_failure, "%s", error);
        if (!atomic_load(&s->closing)) note_death(s, 1);
        pthread_cond_broadcast(&s->changed);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/*
 * From CHILD_DOWN: the failure of the respawn `awaited` that the caller waited
 * for, a refusal while backing off, or a new respawn (CHILD_STARTING). Under
 * s->lock.
 */
static pb_status begin_respawn(supervisor *s, uint64_t awaited, uint32_t *retry_after_ms, char *error,
                               size_t error_size) {
    if (awaited && s->failed_respawn == awaited) {
        plugin_set_error(error, error_size, "llama-server could not be restarted: %s", s->respawn_failure);
        return PB_ERR_ENGINE_UNAVAILABLE;
    }
    double wait_ms = s->refuse_until_ms - plugin_now_ms();
    if (wait_ms > 0) {
        *retry_after_ms = (uint32_t)wait_ms + 1;
        plugin_set_error(error, error_size,
                         "llama-server keeps exiting soon after it starts (%d times in a row); Patchbay starts it "
                         "again in %u s. The end of its log is in Patchbay's log.",
                         s->quick_deaths, (unsigned)((wait_ms + 999) / 1000));
        return PB_ERR_ENGINE_UNAVAILABLE;
    }
    if (s->has_respawner) pthread_join(s->respawner, NULL); /* it has ended: the state left STARTING */
    s->has_respawner = pthread_create(&s->respawner, NULL, respawn_main, s) == 0;
    if (!s->has_respawner) {
        plugin_set_error(error, error_size, "Could not start a thread to restart llama-server.");
        return PB_ERR_INTERNAL;
    }
    s->state = CHILD_STARTING;
    s->respawns++;
    plugin_log(plugin_host, PB_LOG_INFO, "restarting llama-server for %s", s->child.config->model_path);
    return PB_OK;
}

static void wait_changed(supervisor *s, int ms) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_nsec += (long)ms * 1000000L;
    until.tv_sec += until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&s->changed, &s->lock, &until);
}

/* One poll of a respawn under way (CHILD_STARTING). Under s->lock, which it lets go to ask the waiter. */
static pb_status wait_for_respawn(supervisor *s, const child_waiter *waiter, uint32_t *retry_after_ms, char *error,
                                  size_t error_size) {
    pthread_mutex_unlock(&s->lock);
    int gives_up = waiter->gives_up && waiter->gives_up(waiter->context);
    pthread_mutex_lock(&s->lock);
    if (gives_up) {
        plugin_set_error(error, error_size, "Stopped while waiting for llama-server to restart.");
        return PB_ERR_CANCELLED;
    }
    if (waiter->deadline_ms > 0 && plugin_now_ms() > waiter->deadline_ms) {
        *retry_after_ms = DEFAULT_RETRY_AFTER_MS;
        plugin_set_error(error, error_size, "llama-server is restarting; try again shortly.");
        return PB_ERR_OVERLOADED;
    }
    if (s->state == CHILD_STARTING) wait_changed(s, RESPAWN_POLL_MS);
    return PB_OK;
}

pb_status supervisor_ensure_child(supervisor *s, const child_waiter *waiter, uint64_t *generation,
                                  uint32_t *retry_after_ms, char *error, size_t error_size) {
    *retry_after_ms = 0;
    pthread_mutex_lock(&s->lock);
    pb_status status = PB_OK;
    uint64_t awaited = 0; /* the respawn this call waits for */
    while (status == PB_OK) {
        int wait_status;
        if (atomic_load(&s->closing)) {
            plugin_set_error(error, error_size, "The model is being unloaded.");
            status = PB_ERR_ENGINE_UNAVAILABLE;
            break;
        }
        if (s->state == CHILD_UP) {
            if (!child_exited(s->pid, &wait_status)) break;
            child_died(s, wait_status);
        }
        if (s->state == CHILD_DOWN) status = begin_respawn(s, awaited, retry_after_ms, error, error_size);
        if (status != PB_OK) break;
        awaited = s->respawns;
        status = wait_for_respawn(s, waiter, retry_after_ms, error, error_size);
    }
    *generation = s->generation;
    pthread_mutex_unlock(&s->lock);
    return status;
}

void supervisor_lost_connection(supervisor *s, uint64_t generation, const char *transfer_error, char *out,
                                size_t size) {
    pthread_mutex_lock(&s->lock);
    int wait_status;
    if (s->state == CHILD_UP && s->generation == generation && child_exited(s->pid, &wait_status))
        child_died(s, wait_status);
    if (s->state != CHILD_UP || s->generation != generation)
        plugin_set_error(out, size, "Lost connection to the model server: llama-server exited (%s). It is restarted "
                         "on the next request.", s->last_exit);
    else
        plugin_set_error(out, size, "Lost connection to the model server (%s).", transfer_error);
    pthread_mutex_unlock(&s->lock);
}
