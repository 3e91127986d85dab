#define _GNU_SOURCE
#include "launch.h"
#include "gguf.h"
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
    free(c->architecture);
    for (size_t i = 0; i < c->extra_count; i++) free(c->extra_args[i]);
    free(c->extra_args);
}

/* ─── llama_extra_args: an allowlist ────────────────────────────────────── */

typedef struct allowed_flag {
    const char *name;
    int takes_value; /* the next element is its value, whatever it looks like (as llama-server reads it) */
} allowed_flag;

/*
 * Tuning flags of llama-server (`llama-server --help`), in every spelling it
 * takes. Nothing here names a file or a host, or touches what Patchbay
 * manages; a flag that is not here is refused. --mlock, --mmap and --no-mmap
 * are older builds' spellings of --load-mode.
 */
static const allowed_flag k_allowed_flags[] = {
    /* threads and CPU placement */
    {"-tb", 1}, {"--threads-batch", 1}, {"--threads-http", 1},
    {"-C", 1}, {"--cpu-mask", 1}, {"-Cr", 1}, {"--cpu-range", 1}, {"--cpu-strict", 1}, {"--poll", 1},
    {"-Cb", 1}, {"--cpu-mask-batch", 1}, {"-Crb", 1}, {"--cpu-range-batch", 1}, {"--cpu-strict-batch", 1},
    {"--poll-batch", 1}, {"--numa", 1},
    /* attention, KV cache, memory */
    {"-fa", 1}, {"--flash-attn", 1}, {"--swa-full", 0},
    {"-kvo", 0}, {"--kv-offload", 0}, {"-nkvo", 0}, {"--no-kv-offload", 0},
    {"--repack", 0}, {"-nr", 0}, {"--no-repack", 0}, {"--no-host", 0},
    {"-dt", 1}, {"--defrag-thold", 1}, {"-lm", 1}, {"--load-mode", 1}, {"-lzm", 1}, {"--lazy-mode", 1},
    {"--mlock", 0}, {"--mmap", 0}, {"--no-mmap", 0},
    {"--cache-reuse", 1}, {"--cache-prompt", 0}, {"--no-cache-prompt", 0}, {"-cram", 1}, {"--cache-ram", 1},
    {"--cache-idle-slots", 0}, {"--no-cache-idle-slots", 0},
    {"-ctxcp", 1}, {"--ctx-checkpoints", 1}, {"--swa-checkpoints", 1}, {"-cms", 1}, {"--checkpoint-min-step", 1},
    {"--context-shift", 0}, {"--no-context-shift", 0}, {"-sps", 1}, {"--slot-prompt-similarity", 1},
    {"-cb", 0}, {"--cont-batching", 0}, {"-nocb", 0}, {"--no-cont-batching", 0},
    {"--warmup", 0}, {"--no-warmup", 0},
    /* RoPE and YaRN scaling */
    {"--rope-scaling", 1}, {"--rope-scale", 1}, {"--rope-freq-base", 1}, {"--rope-freq-scale", 1},
    {"--yarn-orig-ctx", 1}, {"--yarn-ext-factor", 1}, {"--yarn-attn-factor", 1}, {"--yarn-beta-slow", 1},
    {"--yarn-beta-fast", 1},
    /* devices and offloading */
    {"-dev", 1}, {"--device", 1}, {"-ngl", 1}, {"--gpu-layers", 1}, {"--n-gpu-layers", 1},
    {"-sm", 1}, {"--split-mode", 1}, {"-ts", 1}, {"--tensor-split", 1}, {"-mg", 1}, {"--main-gpu", 1},
    {"-fit", 1}, {"--fit", 1}, {"-fitt", 1}, {"--fit-target", 1}, {"-fitc", 1}, {"--fit-ctx", 1},
    {"-cmoe", 0}, {"--cpu-moe", 0}, {"-ncmoe", 1}, {"--n-cpu-moe", 1}, {"-ncffn", 1}, {"--n-cpu-ffn", 1},
    {"-ot", 1}, {"--override-tensor", 1}, {"--op-offload", 0}, {"--no-op-offload", 0},
    {"--mmproj-offload", 0}, {"--no-mmproj-offload", 0}, {"--image-min-tokens", 1}, {"--image-max-tokens", 1},
    /* sampling defaults (a request's own settings win) */
    {"-n", 1}, {"--predict", 1}, {"--n-predict", 1}, {"--keep", 1}, {"--ignore-eos", 0},
    {"--samplers", 1}, {"--sampler-seq", 1}, {"--sampling-seq", 1}, {"-s", 1}, {"--seed", 1},
    {"--temp", 1}, {"--temperature", 1}, {"--top-k", 1}, {"--top-p", 1}, {"--min-p", 1},
    {"--top-nsigma", 1}, {"--top-n-sigma", 1}, {"--xtc-probability", 1}, {"--xtc-threshold", 1},
    {"--typical", 1}, {"--typical-p", 1}, {"--repeat-last-n", 1}, {"--repeat-penalty", 1},
    {"--presence-penalty", 1}, {"--frequency-penalty", 1}, {"--dry-multiplier", 1}, {"--dry-base", 1},
    {"--dry-allowed-length", 1}, {"--dry-penalty-last-n", 1}, {"--dry-sequence-breaker", 1},
    {"--dynatemp-range", 1}, {"--dynatemp-exp", 1}, {"--mirostat", 1}, {"--mirostat-lr", 1},
    {"--mirostat-ent", 1},
    /* chat template and reasoning */
    {"--jinja", 0}, {"--chat-template-kwargs", 1}, {"--reasoning-format", 1}, {"-rea", 1}, {"--reasoning", 1},
    {"--reasoning-effort", 1}, {"--reasoning-budget", 1}, {"--reasoning-preserve", 0},
    {"--no-reasoning-preserve", 0},
    {NULL, 0},
};

/* Flags that a load field sets: the refusal names the field. */
static const char *const k_field_flags[][2] = {
    {"-m", "model_path"}, {"--model", "model_path"}, {"-c", "max_seq_length"}, {"--ctx-size", "max_seq_length"},
    {"-b", "n_batch"}, {"--batch-size", "n_batch"}, {"-ub", "n_ubatch"}, {"--ubatch-size", "n_ubatch"},
    {"-t", "n_threads"}, {"--threads", "n_threads"}, {"-np", "n_parallel"}, {"--parallel", "n_parallel"},
    {"-ctk", "cache_type_kv"}, {"--cache-type-k", "cache_type_kv"}, {"-ctv", "cache_type_kv"},
    {"--cache-type-v", "cache_type_kv"}, {"-mm", "mmproj_path"}, {"--mmproj", "mmproj_path"},
    {"--chat-template", "chat_template_override"}, {"--chat-template-file", "chat_template_override"},
    {"--embedding", "embedding"}, {"--embeddings", "embedding"}, {"--pooling", "pooling"},
    {NULL, NULL},
};

static const allowed_flag *find_allowed(const char *flag) {
    for (const allowed_flag *f = k_allowed_flags; f->name; f++)
        if (strcmp(f->name, flag) == 0) return f;
    return NULL;
}

static void refuse_flag(const char *flag, char *error, size_t error_size) {
    for (size_t i = 0; k_field_flags[i][0]; i++) {
        if (strcmp(k_field_flags[i][0], flag) == 0) {
            plugin_set_error(error, error_size, "'llama_extra_args' may not set %s: use the load field '%s'.", flag,
                             k_field_flags[i][1]);
            return;
        }
    }
    plugin_set_error(error, error_size,
                     "'llama_extra_args' may not pass %s: it takes only llama-server's tuning flags "
                     "(see \"Fields of load\" in the README).", flag);
}

/* The flag of an element ("--flag" or "--flag=value") as llama-server reads it: "--" flags with '_' as '-'. */
static char *flag_name(const char *arg) {
    char *flag = strndup(arg, strcspn(arg, "="));
    if (flag && strncmp(flag, "--", 2) == 0)
        for (char *c = flag; *c; c++)
            if (*c == '_') *c = '-';
    return flag;
}

static pb_status out_of_memory(char *error, size_t error_size) {
    plugin_set_error(error, error_size, "Out of memory.");
    return PB_ERR_OUT_OF_MEMORY;
}

static int push_arg(launch_config *config, char *arg) {
    if (!arg) return 0;
    config->extra_args[config->extra_count++] = arg;
    return 1;
}

/*
 * Checks llama_extra_args against the allowlist and keeps them as llama-server
 * will read them: "--flag=value" (which llama-server does not parse) becomes
 * two elements, and a flag that takes a value consumes the next element as it,
 * so that no value can pass for a flag of its own.
 */
static pb_status read_extra_args(const json_value *extra, launch_config *config, char *error, size_t error_size) {
    if (!extra || extra->kind == JSON_NULL) return PB_OK;
    if (extra->kind != JSON_ARRAY) {
        plugin_set_error(error, error_size, "'llama_extra_args' must be an array of strings.");
        return PB_ERR_INVALID_REQUEST;
    }
    config->extra_args = calloc(2 * extra->count + 1, sizeof(char *));
    if (!config->extra_args) return out_of_memory(error, error_size);
    for (size_t i = 0; i < extra->count; i++) {
        const json_value *arg = &extra->items[i];
        if (arg->kind != JSON_STRING) {
            plugin_set_error(error, error_size, "'llama_extra_args' must be an array of strings.");
            return PB_ERR_INVALID_REQUEST;
        }
        char *flag = flag_name(arg->string);
        if (!flag) return out_of_memory(error, error_size);
        const allowed_flag *allowed = find_allowed(flag);
        if (!allowed) {
            refuse_flag(flag, error, error_size);
            free(flag);
            return PB_ERR_INVALID_REQUEST;
        }
        push_arg(config, flag);
        const char *inline_value = strchr(arg->string, '=');
        if (!allowed->takes_value) {
            if (!inline_value) continue;
            plugin_set_error(error, error_size, "'llama_extra_args': %s takes no value.", allowed->name);
            return PB_ERR_INVALID_REQUEST;
        }
        const json_value *value = inline_value || i + 1 >= extra->count ? NULL : &extra->items[++i];
        if (!inline_value && (!value || value->kind != JSON_STRING)) {
            plugin_set_error(error, error_size, "'llama_extra_args': %s needs a value (a string after it).",
                             allowed->name);
            return PB_ERR_INVALID_REQUEST;
        }
        if (!push_arg(config, strdup(inline_value ? inline_value + 1 : value->string)))
            return out_of_memory(error, error_size);
    }
    return PB_OK;
}

/* ─── The executable and the files beside the model ──────────────────────── */

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

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int is_projector_name(const char *name) {
    return ends_with(name, ".gguf") && (strncmp(name, "mmproj", 6) == 0 || ends_with(name, ".mmproj.gguf"));
}

/* The length of a GGUF name less ".gguf" and a split suffix ("-00001-of-00003"): one model's parts share it. */
static size_t model_stem_length(const char *name) {
    size_t n = strlen(name) - strlen(".gguf");
    unsigned part, parts;
    int consumed = 0;
    if (n > 15 && sscanf(name + n - 15, "-%5u-of-%5u%n", &part, &parts, &consumed) == 2 && consumed == 15) n -= 15;
    return n;
}

static int same_model(const char *a, const char *b) {
    size_t n = model_stem_length(a);
    return n == model_stem_length(b) && strncmp(a, b, n) == 0;
}

static char *readable_in(const char *dir, const char *name) {
    char *path = NULL;
    if (asprintf(&path, "%s/%s", dir, name) < 0) return NULL;
    struct stat st;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, R_OK) == 0) return path;
    free(path);
    return NULL;
}

/*
 * The directory's one projector, when it holds no GGUF model but `file` (and
 * its split parts); NULL otherwise. `*projectors` counts the projectors seen.
 */
static char *sole_projector(const char *dir, const char *file, int *projectors) {
    DIR *d = opendir(dir);
    if (!d) return NULL;
    char *only = NULL;
    int other_models = 0;
    struct dirent *entry;
    while ((entry = readdir(d))) {
        const char *name = entry->d_name;
        if (is_projector_name(name)) {
            if (++*projectors == 1) only = strdup(name);
        } else if (ends_with(name, ".gguf") && !same_model(name, file)) {
            other_models++;
        }
    }
    closedir(d);
    char *result = only && *projectors == 1 && other_models == 0 ? readable_in(dir, only) : NULL;
    free(only);
    return result;
}

/* A vision projector beside the model, by the rule in launch.h; NULL when none matches. */
static char *find_mmproj(const char *model_path, int *projectors) {
    char *dir = strdup(model_path);
    if (!dir) return NULL;
    char *slash = strrchr(dir, '/');
    const char *file = slash ? slash + 1 : model_path;
    if (slash) *slash = 0;
    const char *directory = slash ? (*dir ? dir : "/") : ".";
    size_t stem = ends_with(file, ".gguf") ? strlen(file) - strlen(".gguf") : strlen(file);
    char *by_name[2] = {NULL, NULL};
    char *result = NULL;
    if (asprintf(&by_name[0], "mmproj-%.*s.gguf", (int)stem, file) >= 0 &&
        asprintf(&by_name[1], "%.*s.mmproj.gguf", (int)stem, file) >= 0) {
        for (int i = 0; i < 2 && !result; i++) result = readable_in(directory, by_name[i]);
    }
    if (!result && ends_with(file, ".gguf")) result = sole_projector(directory, file, projectors);
    free(by_name[0]);
    free(by_name[1]);
    free(dir);
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

/* ─── The request ───────────────────────────────────────────────────────── */

/* An integer field in [min, max] (`fallback` when absent); 0 and `error` filled when out of range. */
static int read_integer(const json_value *request, const char *key, int64_t fallback, int64_t min, int64_t max,
                        int64_t *out, char *error, size_t error_size) {
    *out = json_get_int64(request, key, fallback);
    if (*out >= min && *out <= max) return 1;
    plugin_set_error(error, error_size, "'%s' must be a number between %lld and %lld.", key, (long long)min,
                     (long long)max);
    return 0;
}

static pb_status read_numbers(const json_value *request, launch_config *config, char *error, size_t error_size) {
    int64_t context, parallel, batch, ubatch, threads, timeout;
    if (!read_integer(request, "max_seq_length", 0, 0, INT32_MAX, &context, error, error_size) ||
        !read_integer(request, "n_parallel", DEFAULT_PARALLEL, 1, 64, &parallel, error, error_size) ||
        !read_integer(request, "n_batch", DEFAULT_BATCH, 1, INT32_MAX, &batch, error, error_size) ||
        !read_integer(request, "n_ubatch", batch < DEFAULT_BATCH ? batch : DEFAULT_BATCH, 1, batch, &ubatch, error,
                      error_size) ||
        !read_integer(request, "n_threads", 0, 0, INT32_MAX, &threads, error, error_size) ||
        !read_integer(request, "load_timeout_s", DEFAULT_LOAD_TIMEOUT_S, 1, 86400, &timeout, error, error_size))
        return PB_ERR_INVALID_REQUEST;
    /* The training context caps the default: beyond it a model is off its training. */
    int64_t trained = config->training_context;
    config->context_size = context > 0 ? context : trained > 0 && trained < DEFAULT_CONTEXT_CAP ? trained : DEFAULT_CONTEXT_CAP;
    config->parallel = (int)parallel;
    config->batch = (int)batch;
    config->ubatch = (int)ubatch;
    config->threads = (int)threads;
    config->load_timeout_s = (int)timeout;
    return PB_OK;
}

static pb_status read_files(const json_value *request, const char *work_dir, launch_config *config, char *error,
                            size_t error_size) {
    config->server_path = find_llama_server();
    if (!is_executable(config->server_path)) {
        plugin_set_error(error, error_size,
                         "llama-server not found%s%s. Build it with scripts/run (it caches llama.cpp under "
                         "~/.cache/patchbay), or set PATCHBAY_LLAMA_SERVER.",
                         config->server_path ? " at " : "", config->server_path ? config->server_path : "");
        return PB_ERR_LOAD_FAILED;
    }
    const char *mmproj = json_get_string(request, "mmproj_path");
    if (mmproj && access(mmproj, R_OK) != 0) {
        plugin_set_error(error, error_size, "Vision projector not found: %s", mmproj);
        return PB_ERR_NOT_FOUND;
    }
    int projectors = 0;
    config->mmproj_path = mmproj ? strdup(mmproj) : find_mmproj(config->model_path, &projectors);
    if (!config->mmproj_path) config->unmatched_projectors = projectors;
    const char *template_text = json_get_string(request, "chat_template_override");
    if (template_text && *template_text) {
        if (asprintf(&config->template_path, "%s/chat-template.jinja", work_dir) < 0 ||
            !write_file(config->template_path, template_text)) {
            plugin_set_error(error, error_size, "Could not write the chat template override to %s.", work_dir);
            return PB_ERR_INTERNAL;
        }
    }
    return PB_OK;
}

pb_status launch_parse_request(const json_value *request, const char *work_dir, launch_config *config,
                               char *error, size_t error_size) {
    const char *model_path = json_get_string(request, "model_path");
    struct stat st;
    if (!model_path || stat(model_path, &st) != 0 || !S_ISREG(st.st_mode)) {
        plugin_set_error(error, error_size, "Model file not found: %s", model_path ? model_path : "(none)");
        return PB_ERR_NOT_FOUND;
    }
    const json_value *server = json_get(request, "llama_server_path");
    if (server && server->kind != JSON_NULL) {
        plugin_set_error(error, error_size,
                         "'llama_server_path' is not accepted: which program runs is the operator's choice, not a "
                         "request's. The llama-server binary comes from $PATCHBAY_LLAMA_SERVER, else the cached "
                         "build, else PATH.");
        return PB_ERR_INVALID_REQUEST;
    }
    config->model_path = strdup(model_path);
    gguf_info info = {0};
    gguf_read_info(model_path, &info);
    config->architecture = info.architecture; /* the config owns it now */
    config->training_context = info.context_length;
    pb_status status = read_numbers(request, config, error, error_size);
    if (status == PB_OK) status = read_extra_args(json_get(request, "llama_extra_args"), config, error, error_size);
    if (status != PB_OK) return status;
    config->cache_type_kv = dup_string(json_get_string(request, "cache_type_kv"));
    if (json_get_bool(request, "embedding", 0)) {
        const char *pooling = json_get_string(request, "pooling");
        config->pooling = strdup(pooling ? pooling : "mean");
    }
    return read_files(request, work_dir, config, error, error_size);
}

char **launch_build_argv(const launch_config *c, const char *socket_path) {
    char **argv = calloc(40 + c->extra_count, sizeof(char *));
    if (!argv) return NULL;
    size_t n = 0;
#define ARG(s) (argv[n++] = strdup(s))
#define ARGF(fmt, ...) (asprintf(&argv[n++], fmt, __VA_ARGS__))
    ARG(c->server_path);
    ARG("--model"); ARG(c->model_path);
    /* A host ending in ".sock" is a Unix socket path to llama-server: no TCP port at all. */
    ARG("--host"); ARG(socket_path);
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
