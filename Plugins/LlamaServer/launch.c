#define _GNU_SOURCE
#include "launch.h"
#include "plugin_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *dup_string(const char *s) { return s ? strdup(s) : NULL; }

void launch_config_free(launch_config *c) {
    free(c->server_path);
    free(c->model_path);
    free(c->mmproj_path);
    free(c->template_path);
    free(c->cache_type_kv);
    free(c->pooling);
    for (size_t i = 0; i < c->extra_count; i++) free(c->extra_args[i]);
    free(c->extra_args);
}

/* Flags the plugin sets itself; a user's extra argument may not override them. */
static const char *const k_owned_flags[] = {
    "-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-hft", "--hf-token",
    "-dr", "--docker-repo", "--host", "--port", "--api-key", "--api-key-file", "--ssl-key-file", "--ssl-cert-file",
    "--path", "--api-prefix", "-a", "--alias", "-np", "--parallel", "-kvu", "--kv-unified", "--mmproj",
    "--mmproj-url", "--embedding", "--embeddings", "--pooling", "--rerank", "--reranking", "--log-file",
    "--log-disable", "--slot-save-path", "--chat-template", "--chat-template-file", "--no-jinja", "--jinja",
    "--ui", "--webui", "--no-ui", "--no-webui", "--tools", "-ag", "--agent", "--mcp-servers-config",
    "--mcp-servers-json", "--media-path", "--models-dir", "--models-preset", "--metrics", "--slots", "--no-slots",
    "--props", "-h", "--help", "--usage", "--version", "-c", "--ctx-size", "-b", "--batch-size", "-ub",
    "--ubatch-size", "-t", "--threads", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
    NULL,
};

static int is_owned_flag(const char *arg) {
    if (arg[0] != '-') return 0;
    size_t length = strcspn(arg, "=");
    for (const char *const *flag = k_owned_flags; *flag; flag++) {
        if (strlen(*flag) == length && strncmp(arg, *flag, length) == 0) return 1;
    }
    return 0;
}

static int is_executable(const char *path) { return path && access(path, X_OK) == 0; }

/* $PATCHBAY_LLAMA_SERVER, then the cached build scripts/lib/engines.sh makes, then PATH. */
static char *find_llama_server(void) {
    const char *env = getenv("PATCHBAY_LLAMA_SERVER");
    if (env && *env) return strdup(env);
    char pattern[PATH_MAX];
    const char *cache = getenv("PATCHBAY_CACHE");
    const char *home = getenv("HOME");
    if (cache && *cache) snprintf(pattern, sizeof pattern, "%s/llama.cpp/src-*/build/bin/llama-server", cache);
    else snprintf(pattern, sizeof pattern, "%s/.cache/patchbay/llama.cpp/src-*/build/bin/llama-server", home ? home : "");
    glob_t found;
    char *result = NULL;
    if (glob(pattern, 0, NULL, &found) == 0 && found.gl_pathc > 0) result = strdup(found.gl_pathv[found.gl_pathc - 1]);
    globfree(&found);
    if (result) return result;
    const char *path = getenv("PATH");
    char *copy = strdup(path ? path : "/usr/local/bin:/usr/bin");
    char *save = NULL;
    for (char *dir = strtok_r(copy, ":", &save); dir && !result; dir = strtok_r(NULL, ":", &save)) {
        char candidate[PATH_MAX];
        snprintf(candidate, sizeof candidate, "%s/llama-server", dir);
        if (is_executable(candidate)) result = strdup(candidate);
    }
    free(copy);
    return result;
}

/* A vision projector beside the model: the first mmproj*.gguf in its directory. */
static char *find_mmproj(const char *model_path) {
    char *dir_copy = strdup(model_path);
    char *slash = strrchr(dir_copy, '/');
    const char *dir = ".";
    if (slash) {
        *slash = 0;
        dir = dir_copy;
    }
    char *result = NULL;
    DIR *d = opendir(dir);
    struct dirent *entry;
    while (d && !result && (entry = readdir(d))) {
        size_t n = strlen(entry->d_name);
        if (strncmp(entry->d_name, "mmproj", 6) == 0 && n > 5 && strcmp(entry->d_name + n - 5, ".gguf") == 0) {
            if (asprintf(&result, "%s/%s", dir, entry->d_name) < 0) result = NULL;
        }
    }
    if (d) closedir(d);
    free(dir_copy);
    return result;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return 0;
    size_t length = strlen(text), written = 0;
    while (written < length) {
        ssize_t n = write(fd, text + written, length - written);
        if (n <= 0) break;
        written += (size_t)n;
    }
    close(fd);
    return written == length;
}

pb_status launch_parse_request(const json_value *request, const char *work_dir, launch_config *config,
                               char *error, size_t error_size) {
    const char *model_path = json_get_string(request, "model_path");
    struct stat st;
    if (!model_path || stat(model_path, &st) != 0 || !S_ISREG(st.st_mode)) {
        plugin_set_error(error, error_size, "Model file not found: %s", model_path ? model_path : "(none)");
        return PB_ERR_NOT_FOUND;
    }
    config->model_path = strdup(model_path);
    config->context_size = (int64_t)json_get_number(request, "max_seq_length", 0);
    config->parallel = (int)json_get_number(request, "n_parallel", DEFAULT_PARALLEL);
    config->batch = (int)json_get_number(request, "n_batch", DEFAULT_BATCH);
    config->ubatch = (int)json_get_number(request, "n_ubatch", config->batch < DEFAULT_BATCH ? config->batch : DEFAULT_BATCH);
    config->threads = (int)json_get_number(request, "n_threads", 0);
    config->load_timeout_s = (int)json_get_number(request, "load_timeout_s", DEFAULT_LOAD_TIMEOUT_S);
    if (config->parallel < 1 || config->parallel > 64) {
        plugin_set_error(error, error_size, "'n_parallel' must be between 1 and 64.");
        return PB_ERR_INVALID_REQUEST;
    }
    if (config->batch < 1 || config->ubatch < 1 || config->ubatch > config->batch) {
        plugin_set_error(error, error_size, "'n_batch' and 'n_ubatch' must be positive, with n_ubatch <= n_batch.");
        return PB_ERR_INVALID_REQUEST;
    }
    config->cache_type_kv = dup_string(json_get_string(request, "cache_type_kv"));
    if (json_get_bool(request, "embedding", 0)) {
        const char *pooling = json_get_string(request, "pooling");
        config->pooling = strdup(pooling ? pooling : "mean");
    }

    const char *server = json_get_string(request, "llama_server_path");
    config->server_path = server ? strdup(server) : find_llama_server();
    if (!is_executable(config->server_path)) {
        plugin_set_error(error, error_size,
                  "llama-server not found%s%s. Build it with scripts/run (it caches llama.cpp under ~/.cache/patchbay), "
                  "or set PATCHBAY_LLAMA_SERVER or 'llama_server_path'.",
                  config->server_path ? " at " : "", config->server_path ? config->server_path : "");
        return PB_ERR_LOAD_FAILED;
    }

    const char *mmproj = json_get_string(request, "mmproj_path");
    if (mmproj && access(mmproj, R_OK) != 0) {
        plugin_set_error(error, error_size, "Vision projector not found: %s", mmproj);
        return PB_ERR_NOT_FOUND;
    }
    config->mmproj_path = mmproj ? strdup(mmproj) : find_mmproj(model_path);

    const char *template_text = json_get_string(request, "chat_template_override");
    if (template_text && *template_text) {
        if (asprintf(&config->template_path, "%s/chat-template.jinja", work_dir) < 0 ||
            !write_file(config->template_path, template_text)) {
            plugin_set_error(error, error_size, "Could not write the chat template override to %s.", work_dir);
            return PB_ERR_INTERNAL;
        }
    }

    const json_value *extra = json_get(request, "llama_extra_args");
    if (extra && extra->kind != JSON_NULL) {
        if (extra->kind != JSON_ARRAY) {
            plugin_set_error(error, error_size, "'llama_extra_args' must be an array of strings.");
            return PB_ERR_INVALID_REQUEST;
        }
        config->extra_args = calloc(extra->count + 1, sizeof(char *));
        for (size_t i = 0; i < extra->count; i++) {
            const json_value *arg = &extra->items[i];
            if (arg->kind != JSON_STRING) {
                plugin_set_error(error, error_size, "'llama_extra_args' must be an array of strings.");
                return PB_ERR_INVALID_REQUEST;
            }
            if (is_owned_flag(arg->string)) {
                plugin_set_error(error, error_size, "'llama_extra_args' may not set %s: Patchbay manages it.", arg->string);
                return PB_ERR_INVALID_REQUEST;
            }
            config->extra_args[config->extra_count++] = strdup(arg->string);
        }
    }
    return PB_OK;
}

char **launch_build_argv(const launch_config *c, int port) {
    char **argv = calloc(40 + c->extra_count, sizeof(char *));
    size_t n = 0;
#define ARG(s) (argv[n++] = strdup(s))
#define ARGF(fmt, ...) (asprintf(&argv[n++], fmt, __VA_ARGS__))
    ARG(c->server_path);
    ARG("--model"); ARG(c->model_path);
    ARG("--host"); ARG("127.0.0.1");
    ARG("--port"); ARGF("%d", port);
    ARG("--jinja");
    ARG("--ctx-size"); ARGF("%lld", (long long)c->context_size);
    ARG("--parallel"); ARGF("%d", c->parallel);
    /* With a unified KV cache every slot may use the whole context. */
    if (c->parallel > 1) ARG("--kv-unified");
    ARG("--batch-size"); ARGF("%d", c->batch);
    ARG("--ubatch-size"); ARGF("%d", c->ubatch);
    if (c->threads > 0) { ARG("--threads"); ARGF("%d", c->threads); }
    if (c->cache_type_kv) {
        ARG("--cache-type-k"); ARG(c->cache_type_kv);
        ARG("--cache-type-v"); ARG(c->cache_type_kv);
    }
    if (c->template_path) { ARG("--chat-template-file"); ARG(c->template_path); }
    if (c->mmproj_path) { ARG("--mmproj"); ARG(c->mmproj_path); }
    if (c->pooling) { ARG("--embedding"); ARG("--pooling"); ARG(c->pooling); }
    ARG("--metrics");
    ARG("--slots");
    ARG("--no-webui");
    for (size_t i = 0; i < c->extra_count; i++) ARG(c->extra_args[i]);
#undef ARG
#undef ARGF
    return argv;
}

void launch_free_argv(char **argv) {
    for (size_t i = 0; argv && argv[i]; i++) free(argv[i]);
    free(argv);
}
