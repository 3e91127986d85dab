#define _GNU_SOURCE
#include "child_process.h"
#include "plugin_util.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ─── The spawner thread ────────────────────────────────────────────────── */

typedef struct spawn_job {
    char *const *argv;
    char **envp;
    int log_fd;
    pid_t pid;
    int error_number;
    int done;
} spawn_job;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_changed = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_one_job_at_a_time = PTHREAD_MUTEX_INITIALIZER;
static spawn_job *g_job;
static pthread_once_t g_spawner_once = PTHREAD_ONCE_INIT;
static int g_spawner_started;
static int g_spawner_stopping; /* under g_lock: child_spawner_shutdown asked the thread to end */
static int g_spawner_ended;    /* under g_lock: it has */

/* Runs in the forked child: only async-signal-safe calls until execve. */
static void exec_child(const spawn_job *job, pid_t parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127); /* the host died before prctl took effect */
    setpgid(0, 0);                      /* a terminal's Ctrl-C goes to the host, which shuts us down in order */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* The host ignores some signals (a dispatch source handles SIGTERM); ignored dispositions survive exec. */
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    dup2(job->log_fd, 1);
    dup2(job->log_fd, 2);
    syscall(SYS_close_range, 3, ~0U, 0); /* no host socket or file leaks into the child */
    execve(job->argv[0], job->argv, job->envp);
    _exit(127);
}

static void *spawner_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&g_lock);
    for (;;) {
        while (!g_spawner_stopping && (!g_job || g_job->done)) pthread_cond_wait(&g_changed, &g_lock);
        if (g_spawner_stopping) break;
        spawn_job *job = g_job;
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid == 0) exec_child(job, parent);
        job->pid = pid;
        job->error_number = pid < 0 ? errno : 0;
        job->done = 1;
        pthread_cond_broadcast(&g_changed);
    }
    g_spawner_ended = 1;
    pthread_cond_broadcast(&g_changed);
    pthread_mutex_unlock(&g_lock);
    return NULL;
}

void child_spawner_shutdown(void) {
    pthread_mutex_lock(&g_lock);
    if (g_spawner_started) {
        g_spawner_stopping = 1;
        pthread_cond_broadcast(&g_changed);
        while (!g_spawner_ended) pthread_cond_wait(&g_changed, &g_lock);
    }
    g_spawner_started = 0; /* child_spawn fails from now on */
    pthread_mutex_unlock(&g_lock);
}

static void start_spawner(void) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* Signals are for the host's own threads. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    g_spawner_started = pthread_create(&thread, &attr, spawner_main, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    pthread_attr_destroy(&attr);
}

/* ─── The environment ───────────────────────────────────────────────────── */

/* What the child inherits: names, and prefixes ending in '_'. */
static const char *const k_inherited[] = {
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
    /* GPU runtimes: which devices, and their tuning */
    "CUDA_", "GGML_", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "HSA_OVERRIDE_GFX_VERSION", "ONEAPI_DEVICE_SELECTOR", "OMP_NUM_THREADS",
    NULL,
};

static size_t name_length(const char *entry) { return strcspn(entry, "="); }

static int is_inherited(const char *entry) {
    size_t n = name_length(entry);
    for (const char *const *name = k_inherited; *name; name++) {
        size_t m = strlen(*name);
        int prefix = (*name)[m - 1] == '_';
        if (prefix ? n > m && strncmp(entry, *name, m) == 0 : n == m && strncmp(entry, *name, n) == 0) return 1;
    }
    return 0;
}

static int is_named_in(const char *entry, char *const list[]) {
    size_t n = name_length(entry);
    for (size_t i = 0; list && list[i]; i++)
        if (name_length(list[i]) == n && strncmp(list[i], entry, n) == 0) return 1;
    return 0;
}

/*
 * The child's environment (see child_spawn), built before the fork: the child
 * may not allocate after it. The strings are borrowed; free only the array.
 */
static char **child_environment(char *const extra_env[]) {
    size_t host_count = 0, extra_count = 0, n = 0;
    while (environ[host_count]) host_count++;
    while (extra_env && extra_env[extra_count]) extra_count++;
    char **envp = calloc(host_count + extra_count + 1, sizeof *envp);
    if (!envp) return NULL;
    for (size_t i = 0; i < host_count; i++)
        if (is_inherited(environ[i]) && !is_named_in(environ[i], extra_env)) envp[n++] = environ[i];
    for (size_t i = 0; i < extra_count; i++) envp[n++] = extra_env[i];
    return envp;
}

/* ─── Spawning ──────────────────────────────────────────────────────────── */

pid_t child_spawn(char *const argv[], char *const extra_env[], const char *log_path, char *error, size_t error_size) {
    pthread_once(&g_spawner_once, start_spawner);
    if (!g_spawner_started) {
        snprintf(error, error_size, "could not start the spawner thread");
        return -1;
    }
    if (access(argv[0], X_OK) != 0) {
        snprintf(error, error_size, "cannot execute %s: %s", argv[0], strerror(errno));
        return -1;
    }
    int log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log_fd < 0) {
        snprintf(error, error_size, "cannot open log %s: %s", log_path, strerror(errno));
        return -1;
    }
    char **envp = child_environment(extra_env);
    if (!envp) {
        close(log_fd);
        snprintf(error, error_size, "out of memory");
        return -1;
    }

    spawn_job job = {.argv = argv, .envp = envp, .log_fd = log_fd};
    pthread_mutex_lock(&g_one_job_at_a_time);
    pthread_mutex_lock(&g_lock);
    g_job = &job;
    pthread_cond_broadcast(&g_changed);
    while (!job.done) pthread_cond_wait(&g_changed, &g_lock);
    g_job = NULL;
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_unlock(&g_one_job_at_a_time);

    free(envp);
    close(log_fd);
    if (job.pid < 0) snprintf(error, error_size, "fork failed: %s", strerror(job.error_number));
    return job.pid;
}

/* ─── Watching and stopping ─────────────────────────────────────────────── */

int child_exited(pid_t pid, int *wait_status) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == 0) return 0;
    if (wait_status) *wait_status = r == pid ? status : 0;
    return 1; /* exited now, or already reaped (ECHILD) */
}

void child_stop(pid_t pid, int grace_ms) {
    if (pid <= 0 || child_exited(pid, NULL)) return;
    kill(pid, SIGTERM);
    for (int waited = 0; waited < grace_ms; waited += 10) {
        if (child_exited(pid, NULL)) return;
        plugin_sleep_ms(10);
    }
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
}

uint64_t child_resident_bytes(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    uint64_t kib = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "VmRSS: %llu kB", (unsigned long long *)&kib) == 1) break;
    }
    fclose(f);
    return kib * 1024;
}

void child_describe_exit(int wait_status, char *out, size_t out_size) {
    if (WIFEXITED(wait_status)) snprintf(out, out_size, "exit status %d", WEXITSTATUS(wait_status));
    else if (WIFSIGNALED(wait_status))
        snprintf(out, out_size, "signal %d (%s)", WTERMSIG(wait_status), strsignal(WTERMSIG(wait_status)));
    else snprintf(out, out_size, "status %d", wait_status);
}

char *file_tail(const char *path, size_t max_bytes) {
    FILE *f = fopen(path, "r");
    char *out = NULL;
    if (f && fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        long start = size > (long)max_bytes ? size - (long)max_bytes : 0;
        fseek(f, start, SEEK_SET);
        out = calloc((size_t)(size - start) + 1, 1);
        if (out) {
            size_t n = fread(out, 1, (size_t)(size - start), f);
            out[n] = 0;
            char *newline = start > 0 ? strchr(out, '\n') : NULL;
            if (newline) memmove(out, newline + 1, strlen(newline + 1) + 1);
        }
    }
    if (f) fclose(f);
    return out ? out : calloc(1, 1);
}
