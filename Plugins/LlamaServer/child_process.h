/*
 * child_process.h — spawning and reaping the llama-server children.
 *
 * A child must never outlive the host, not even when the host is killed with
 * SIGKILL. Linux's PR_SET_PDEATHSIG does that, but it fires when the *thread*
 * that forked the child exits, not the process. So every child is forked by
 * one long-lived spawner thread that this module owns, never by the short-lived
 * load and run threads the host hands us.
 */
#ifndef PB_LLAMA_CHILD_PROCESS_H
#define PB_LLAMA_CHILD_PROCESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/**
 * Starts `argv[0]` with `argv`, stdin from /dev/null and stdout and stderr
 * appended to `log_path`. Returns the pid, or -1 with `error` filled.
 *
 * The environment is filtered: of the host's, only what a process needs
 * (PATH, HOME, the locale, TMPDIR, LD_LIBRARY_PATH) and the device selection
 * of GPU runtimes (CUDA_*, GGML_*, HIP_VISIBLE_DEVICES, …) pass; never
 * PATCHBAY_* or llama-server's own LLAMA_ARG_* and LLAMA_API_KEY, which would
 * configure the child behind Patchbay's back. Then `extra_env` ("NAME=value"
 * strings, NULL-terminated), whose names replace inherited ones.
 */
pid_t child_spawn(char *const argv[], char *const extra_env[], const char *log_path, char *error, size_t error_size);

/**
 * Ends the spawner thread, once no child is left (its exit would SIGKILL the
 * children it forked). child_spawn fails afterwards. For the plugin's shutdown.
 */
void child_spawner_shutdown(void);

/** Reaps the child if it has exited: 1 (and `*wait_status`) when it has, 0 while it runs. */
int child_exited(pid_t pid, int *wait_status);

/** SIGTERM, up to `grace_ms` for it to exit, then SIGKILL; always reaps. */
void child_stop(pid_t pid, int grace_ms);

/** The child's resident memory (VmRSS) in bytes, 0 when unknown. */
uint64_t child_resident_bytes(pid_t pid);

/** Describes a wait status: "exit status 1", "signal 9 (Killed)". */
void child_describe_exit(int wait_status, char *out, size_t out_size);

/** The last `max_bytes` of a file, trimmed to whole lines, as a malloc'd string ("" if unreadable). */
char *file_tail(const char *path, size_t max_bytes);

#endif
