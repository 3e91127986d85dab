// plugin.cpp — the libllama backend's ABI table: llama.cpp in the host's own process.
//
// Load request fields (all optional but model_path), the same as the llama-server
// backend's where they mean the same thing:
//   model_path, max_seq_length (absent or 0: the training context, at most 8192),
//   n_parallel (slots, 4), n_batch (the largest prompt chunk one step decodes, 128),
//   n_ubatch (128), n_threads (0: llama.cpp's default), n_gpu_layers (GPU builds; -1:
//   as many as fit), cache_type_kv (f16, q8_0, …), chat_template_override (Jinja text),
//   pooling (for embeddings: mean, cls, last; "mean"), kv_unified (false).
//
// KV cache: by default every slot has a cache of its own, max_seq_length tokens long
// (memory: slots x context). A slot's numbers then never depend on what its neighbours
// hold, so a request's greedy answer is the same alone or in a full batch. kv_unified:
// true shares one max_seq_length cache among the slots, as llama-server --kv-unified: less
// memory, but a neighbour's cells change the attention's rounding, which can flip a
// near-tie token.
// Refused: llama_extra_args (there is no command line) and mmproj_path (text only).
#include "libllama.h"

#include "gguf.h"
#include "log.h"

#include <malloc.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>


namespace {

constexpr int64_t default_context_cap = 8192;  // as the llama-server backend (launch.h)

void set_error(char *error, size_t size, const std::string &message) {
    plugin_set_error(error, size, "%s", message.c_str());
}

// llama.cpp's and ggml's own log lines: warnings and errors reach the host's log.
void forward_llama_log(ggml_log_level level, const char *text, void *) {
    if (level != GGML_LOG_LEVEL_WARN && level != GGML_LOG_LEVEL_ERROR) return;
    if (g_deliberate_aborts.load() > 0) return;  // a cancel's abort, which llama.cpp reports as a failure
    std::string line(text);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    if (!line.empty()) plugin_log(plugin_host, level == GGML_LOG_LEVEL_ERROR ? PB_LOG_ERROR : PB_LOG_WARNING, "%s", line.c_str());
}

// ─── Load ────────────────────────────────────────────────────────────────────────────

// The training context from the GGUF's metadata (0: not found), read before loading.
int64_t training_context(const std::string &path) {
    gguf_init_params params{/*no_alloc=*/true, /*ctx=*/nullptr};
    gguf_context *gguf = gguf_init_from_file(path.c_str(), params);
    if (!gguf) return 0;
    int64_t value = 0;
    int64_t arch_key = gguf_find_key(gguf, "general.architecture");
    if (arch_key >= 0 && gguf_get_kv_type(gguf, arch_key) == GGUF_TYPE_STRING) {
        std::string key = std::string(gguf_get_val_str(gguf, arch_key)) + ".context_length";
        int64_t id = gguf_find_key(gguf, key.c_str());
        if (id >= 0 && gguf_get_kv_type(gguf, id) == GGUF_TYPE_UINT32) value = gguf_get_val_u32(gguf, id);
        if (id >= 0 && gguf_get_kv_type(gguf, id) == GGUF_TYPE_UINT64) value = (int64_t)gguf_get_val_u64(gguf, id);
    }
    gguf_free(gguf);
    return value;
}

bool read_integer(const json &request, const char *key, int64_t fallback, int64_t min, int64_t max, int64_t &out,
                  std::string &error) {
    out = fallback;
    if (request.contains(key) && !request.at(key).is_null()) {
        const json &value = request.at(key);
        if (!value.is_number() || std::floor(value.get<double>()) != value.get<double>()) {
            error = std::string("'") + key + "' must be an integer.";
            return false;
        }
        double number = value.get<double>();
        out = number > 9e18 ? INT64_MAX : number < -9e18 ? INT64_MIN : (int64_t)number;
    }
    if (out >= min && out <= max) return true;
    error = std::string("'") + key + "' must be between " + std::to_string(min) + " and " + std::to_string(max) + ".";
    return false;
}

bool read_cache_type(const std::string &name, ggml_type &out) {
    static const std::pair<const char *, ggml_type> types[] = {
        {"f32", GGML_TYPE_F32},       {"f16", GGML_TYPE_F16},   {"bf16", GGML_TYPE_BF16}, {"q8_0", GGML_TYPE_Q8_0},
        {"q4_0", GGML_TYPE_Q4_0},     {"q4_1", GGML_TYPE_Q4_1}, {"iq4_nl", GGML_TYPE_IQ4_NL},
        {"q5_0", GGML_TYPE_Q5_0},     {"q5_1", GGML_TYPE_Q5_1},
    };
    for (const auto &type : types)
        if (name == type.first) {
            out = type.second;
            return true;
        }
    return false;
}

pb_status read_settings(const json &request, load_settings &settings, std::string &error) {
    if (!request.contains("model_path") || !request.at("model_path").is_string()) {
        error = "'model_path' is required.";
        return PB_ERR_INVALID_REQUEST;
    }
    settings.model_path = request.at("model_path").get<std::string>();
    for (const char *refused : {"llama_extra_args", "llama_server_path"})
        if (request.contains(refused) && !request.at(refused).is_null()) {
            error = std::string("'") + refused + "' belongs to the llama-server backend; the libllama backend "
                    "runs no program and takes no command line (its settings are the load fields).";
            return PB_ERR_INVALID_REQUEST;
        }
    if (request.contains("mmproj_path") && !request.at("mmproj_path").is_null()) {
        error = "The libllama backend is text only; load vision models with backend \"llama-server\".";
        return PB_ERR_UNSUPPORTED;
    }
    int64_t context, parallel, batch, ubatch, threads, gpu_layers;
    if (!read_integer(request, "max_seq_length", 0, 0, INT32_MAX, context, error) ||
        !read_integer(request, "n_parallel", 4, 1, 64, parallel, error) ||
        !read_integer(request, "n_batch", 128, 1, 1 << 20, batch, error) ||
        !read_integer(request, "n_ubatch", std::min<int64_t>(batch, 128), 1, batch, ubatch, error) ||
        !read_integer(request, "n_threads", 0, 0, 1024, threads, error) ||
        !read_integer(request, "n_gpu_layers", -1, -1, 100000, gpu_layers, error))
        return PB_ERR_INVALID_REQUEST;
    settings.context_size = context;
    settings.parallel = (int)parallel;
    settings.batch = (int)batch;
    settings.ubatch = (int)ubatch;
    settings.threads = (int)threads;
    settings.gpu_layers = (int)gpu_layers;
    if (request.contains("cache_type_kv") && request.at("cache_type_kv").is_string()) {
        std::string name = request.at("cache_type_kv").get<std::string>();
        if (!read_cache_type(name, settings.cache_type)) {
            error = "'cache_type_kv' must be one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1 (got '" + name + "').";
            return PB_ERR_INVALID_REQUEST;
        }
    }
    if (request.contains("kv_unified") && !request.at("kv_unified").is_null()) {
        if (!request.at("kv_unified").is_boolean()) {
            error = "'kv_unified' must be true or false.";
            return PB_ERR_INVALID_REQUEST;
        }
        settings.kv_unified = request.at("kv_unified").get<bool>();
    }
    if (request.contains("chat_template_override") && request.at("chat_template_override").is_string())
        settings.chat_template_override = request.at("chat_template_override").get<std::string>();
    if (request.contains("pooling") && request.at("pooling").is_string()) {
        settings.pooling = request.at("pooling").get<std::string>();
        if (settings.pooling != "mean" && settings.pooling != "cls" && settings.pooling != "last") {
            error = "'pooling' must be mean, cls or last.";
            return PB_ERR_INVALID_REQUEST;
        }
    }
    return PB_OK;
}

struct load_progress {
    const pb_load_callbacks *callbacks;
    uint64_t size;
    bool cancelled = false;
};

bool on_load_progress(float fraction, void *data) {
    auto *progress = static_cast<load_progress *>(data);
    const pb_load_callbacks *callbacks = progress->callbacks;
    if (!callbacks || !PB_HAS(callbacks, progress) || !callbacks->progress) return true;
    uint64_t loaded = (uint64_t)(std::min(1.0f, std::max(0.0f, fraction)) * (double)progress->size);
    if (callbacks->progress(callbacks->context, "load", loaded, progress->size) != 0) progress->cancelled = true;
    return !progress->cancelled;
}

// llama-server's settings for chat templates and requests (server-context.cpp, load_model).
pb_status prepare_chat(pb_model *model, std::string &error) {
    try {
        model->chat.use_jinja = true;
        model->chat.prefill_assistant = model->params_base.prefill_assistant;
        model->chat.reasoning_format = model->params_base.reasoning_format;
        model->chat.chat_template_kwargs = model->params_base.default_template_kwargs;
        model->chat.tmpls = common_chat_templates_init(model->model, model->settings.chat_template_override);
        model->chat.allow_image = model->chat.allow_audio = model->chat.allow_video = false;
        model->chat.enable_thinking = model->params_base.enable_reasoning != 0 &&
                                      common_chat_templates_support_enable_thinking(model->chat.tmpls.get());
        model->chat.reasoning_budget = model->params_base.sampling.reasoning_budget_tokens;
        model->chat.reasoning_budget_message = model->params_base.sampling.reasoning_budget_message;
    } catch (const std::exception &e) {
        error = std::string("The chat template could not be read: ") + e.what();
        return PB_ERR_INVALID_REQUEST;
    }
    return PB_OK;
}

void free_model(pb_model *model) {
    if (model->embed_ctx) llama_free(model->embed_ctx);
    model->chat.tmpls.reset();
    model->init.reset();  // frees the context, then the model
    delete model;
    malloc_trim(0);  // hand the freed heap back to the system, not just to malloc
}

pb_status lib_load(const char *request_json, const pb_load_callbacks *callbacks, pb_model **out_model, char *error,
                   size_t error_size) {
    std::string message;
    json request = json::parse_no_throw(request_json ? request_json : "");
    if (!request.is_object()) {
        set_error(error, error_size, "The load request is not a JSON object.");
        return PB_ERR_INVALID_REQUEST;
    }
    auto *model = new pb_model();
    pb_status status = read_settings(request, model->settings, message);
    FILE *file = status == PB_OK ? fopen(model->settings.model_path.c_str(), "rb") : nullptr;
    if (status == PB_OK && !file) {
        message = "Model file not found: " + model->settings.model_path;
        status = PB_ERR_NOT_FOUND;
    }
    uint64_t size = 0;
    if (file) {
        fseeko(file, 0, SEEK_END);
        size = (uint64_t)ftello(file);
        fclose(file);
    }
    if (status != PB_OK) {
        set_error(error, error_size, message);
        delete model;
        return status;
    }
    const load_settings &settings = model->settings;
    int64_t trained = training_context(settings.model_path);
    model->context_length = settings.context_size > 0 ? settings.context_size
                            : trained > 0 && trained < default_context_cap ? trained : default_context_cap;

    // The parameters llama-server would run with for the same load fields (launch.c).
    common_params &params = model->params_base;
    params.model.path = settings.model_path;
    // max_seq_length is what one request may use: the whole cache when the slots share
    // it, each slot's own cache otherwise.
    params.n_ctx = (int32_t)std::min<int64_t>(INT32_MAX, model->context_length * (settings.kv_unified ? 1 : settings.parallel));
    params.n_parallel = settings.parallel;
    params.kv_unified = settings.kv_unified;
    params.n_batch = settings.batch;
    params.n_ubatch = settings.ubatch;
    params.cache_type_k = params.cache_type_v = settings.cache_type;
    params.n_gpu_layers = settings.gpu_layers;
    if (settings.threads > 0) params.cpuparams.n_threads = settings.threads;
    postprocess_cpu_params(params.cpuparams, nullptr);
    postprocess_cpu_params(params.cpuparams_batch, &params.cpuparams);
    load_progress progress{callbacks, size};
    params.load_progress_callback = on_load_progress;
    params.load_progress_callback_user_data = &progress;

    model->init = common_init_from_params(params);
    params.load_progress_callback = nullptr;
    model->model = model->init ? model->init->model() : nullptr;
    model->ctx = model->init ? model->init->context() : nullptr;
    if (!model->model || !model->ctx) {
        bool cancelled = progress.cancelled;
        set_error(error, error_size, cancelled ? "The load was cancelled."
                                               : "llama.cpp could not load " + settings.model_path +
                                                     " (see the log above for why).");
        free_model(model);
        return cancelled ? PB_ERR_CANCELLED : PB_ERR_LOAD_FAILED;
    }
    model->vocab = llama_model_get_vocab(model->model);
    for (llama_token token = 0; token < llama_vocab_n_tokens(model->vocab); token++)
        if (llama_vocab_is_eog(model->vocab, token)) model->logit_bias_eog.push_back({token, -INFINITY});
    char architecture[128] = "";
    llama_model_meta_val_str(model->model, "general.architecture", architecture, sizeof architecture);
    model->architecture = architecture;
    model->context_length = llama_n_ctx_seq(model->ctx);  // what llama.cpp made (it may round up)
    if ((status = prepare_chat(model, message)) != PB_OK) {
        set_error(error, error_size, message);
        free_model(model);
        return status;
    }
    if (callbacks && PB_HAS(callbacks, progress) && callbacks->progress &&
        callbacks->progress(callbacks->context, "ready", size, size) != 0) {
        set_error(error, error_size, "The load was cancelled.");
        free_model(model);
        return PB_ERR_CANCELLED;
    }
    engine_start(model);
    plugin_log(plugin_host, PB_LOG_INFO, "loaded %s: %s, context %lld, %d slots (%s KV cache), batch %d/%d, %d threads",
               settings.model_path.c_str(), model->architecture.c_str(), (long long)model->context_length,
               settings.parallel, settings.kv_unified ? "one shared" : "a per-slot", settings.batch, settings.ubatch,
               params.cpuparams.n_threads);
    *out_model = model;
    return PB_OK;
}

void lib_model_info(pb_model *model, pb_model_info *info) {
    if (PB_HAS(info, context_length)) info->context_length = model->context_length;
    if (PB_HAS(info, capabilities)) {
        uint64_t caps = PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_TOKENIZE | PB_CAP_EMBEDDINGS | PB_CAP_REASONING;
        auto template_caps = common_chat_templates_get_caps(model->chat.tmpls.get());
        auto tools = template_caps.find("supports_tools");
        if (tools != template_caps.end() && tools->second) caps |= PB_CAP_TOOLS;
        info->capabilities = caps;
    }
    if (PB_HAS(info, parallel_slots)) info->parallel_slots = model->settings.parallel;
    if (PB_HAS(info, embedding_dimensions)) info->embedding_dimensions = llama_model_n_embd(model->model);
    if (PB_HAS(info, training_context_length)) info->training_context_length = llama_model_n_ctx_train(model->model);
    if (PB_HAS(info, parameter_count)) info->parameter_count = (int64_t)llama_model_n_params(model->model);
    if (PB_HAS(info, size_bytes)) info->size_bytes = llama_model_size(model->model);
    if (PB_HAS(info, architecture)) info->architecture = model->architecture.c_str();
}

void lib_unload(pb_model *model) {
    engine_stop(model);
    std::string path = model->settings.model_path;
    free_model(model);
    plugin_log(plugin_host, PB_LOG_INFO, "unloaded %s", path.c_str());
}

// ─── Runs ────────────────────────────────────────────────────────────────────────────

pb_status lib_run_create(pb_model *model, const char *request_json, pb_run **out_run, char *error,
                         size_t error_size) {
    auto *run = new pb_run();
    run->model = model;
    std::string message;
    pb_status status = prepare_request(model, request_json ? request_json : "", false, run->request, message);
    if (status == PB_OK) {
        run->request.sampler = common_sampler_init(model->model, run->request.params.sampling);
        if (!run->request.sampler) {
            message = "The sampler could not be made from this request (is the grammar or JSON schema valid?).";
            status = PB_ERR_INVALID_REQUEST;
        }
    }
    if (status != PB_OK) {
        set_error(error, error_size, message);
        delete run;
        return status;
    }
    *out_run = run;
    return PB_OK;
}

void lib_run_execute(pb_run *run, const pb_event_sink *sink) {
    run->sink = sink;
    if (run->request.max_wall_ms > 0) {
        run->has_deadline = true;
        run->deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(run->request.max_wall_ms);
    }
    engine_submit(run->model, run);  // a run cancelled already ends at the engine's next turn
    std::unique_lock<std::mutex> lock(run->done_mutex);
    run->done_cv.wait(lock, [run] { return run->done; });
}

void lib_run_cancel(pb_run *run) {
    if (run->cancelled.exchange(true)) return;
    run->cancel_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::steady_clock::now().time_since_epoch()).count());
    engine_wake(run->model);
}

void lib_run_destroy(pb_run *run) {
    if (run->request.sampler) common_sampler_free(run->request.sampler);
    delete run;
}

// ─── Tokens and embeddings ───────────────────────────────────────────────────────────

pb_status lib_count_tokens(pb_model *model, const char *request_json, int64_t *out_count, char *error,
                           size_t error_size) {
    prepared_request request;
    std::string message;
    pb_status status = prepare_request(model, request_json ? request_json : "", true, request, message);
    if (status != PB_OK) {
        set_error(error, error_size, message);
        return status;
    }
    *out_count = (int64_t)request.prompt.size();
    return PB_OK;
}

// The embedding context: made on first use beside the generation context (the model's
// weights are shared), with pooling, holding one text of up to this many tokens.
constexpr int64_t embed_context_cap = 2048;

pb_status lib_embed(pb_model *model, const char *text, size_t text_len, float *out, size_t out_capacity,
                    size_t *out_dimensions, char *error, size_t error_size) {
    size_t dimensions = (size_t)llama_model_n_embd(model->model);
    *out_dimensions = dimensions;
    if (dimensions > out_capacity) {
        set_error(error, error_size, "The output buffer is too small.");
        return PB_ERR_INVALID_REQUEST;
    }
    std::lock_guard<std::mutex> lock(model->embed_mutex);
    if (!model->embed_ctx) {
        llama_context_params params = llama_context_default_params();
        uint32_t size = (uint32_t)std::min<int64_t>(model->context_length, embed_context_cap);
        params.n_ctx = params.n_batch = params.n_ubatch = size;
        params.n_seq_max = 1;
        params.embeddings = true;
        params.pooling_type = model->settings.pooling == "cls"    ? LLAMA_POOLING_TYPE_CLS
                              : model->settings.pooling == "last" ? LLAMA_POOLING_TYPE_LAST
                                                                  : LLAMA_POOLING_TYPE_MEAN;
        params.n_threads = params.n_threads_batch = model->params_base.cpuparams.n_threads;
        model->embed_ctx = llama_init_from_model(model->model, params);
        if (!model->embed_ctx) {
            set_error(error, error_size, "llama.cpp could not make an embedding context for this model.");
            return PB_ERR_INTERNAL;
        }
    }
    std::vector<llama_token> tokens = common_tokenize(model->vocab, std::string(text, text_len), true, true);
    if (tokens.empty()) {
        set_error(error, error_size, "The text is empty.");
        return PB_ERR_INVALID_REQUEST;
    }
    if (tokens.size() > llama_n_ubatch(model->embed_ctx)) {
        set_error(error, error_size, "The text is " + std::to_string(tokens.size()) + " tokens; embeddings take at most " +
                                         std::to_string(llama_n_ubatch(model->embed_ctx)) + ".");
        return PB_ERR_CONTEXT_LENGTH_EXCEEDED;
    }
    llama_memory_clear(llama_get_memory(model->embed_ctx), true);
    llama_batch batch = llama_batch_init((int32_t)tokens.size(), 0, 1);
    for (size_t i = 0; i < tokens.size(); i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = (llama_pos)i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t)tokens.size();
    int status = llama_decode(model->embed_ctx, batch);
    llama_batch_free(batch);
    const float *embedding = status == 0 ? llama_get_embeddings_seq(model->embed_ctx, 0) : nullptr;
    if (!embedding) {
        set_error(error, error_size, "llama.cpp could not compute the embedding (" + std::to_string(status) + ").");
        return PB_ERR_INTERNAL;
    }
    common_embd_normalize(embedding, out, (int)dimensions, 2);  // unit length, as llama-server's default
    return PB_OK;
}

// ─── The table ───────────────────────────────────────────────────────────────────────

// Any GGUF file: the llama-server backend answers 100 for the same files, so it stays the
// default for GGUF unless the operator prefers this one (--prefer-backend libllama) or a
// load names it (backend: "libllama").
int32_t lib_probe(const char *model_path, char *detail, size_t detail_size) {
    char magic[4] = {0};
    std::ifstream file(model_path, std::ios::binary);
    if (!file.read(magic, 4) || memcmp(magic, "GGUF", 4) != 0) {
        set_error(detail, detail_size, "not a GGUF file");
        return 0;
    }
    set_error(detail, detail_size, "GGUF (in-process llama.cpp; text only)");
    return 50;
}

// Every model is unloaded: stop llama.cpp's own threads too. common's log worker starts with
// the first message logged through it (a failed load logs one) and would outlive the plugin.
void lib_shutdown(void) {
    common_log_pause(common_log_main());
    llama_backend_free();
}

const pb_plugin_api libllama_api = {
    /* struct_size */ sizeof(pb_plugin_api),
    /* abi_major */ PB_ABI_VERSION_MAJOR,
    /* abi_minor */ PB_ABI_VERSION_MINOR,
    /* name */ "libllama",
    /* version */ "1.0.0",
    /* description */ "llama.cpp in-process (GGUF): continuous batching, prompt-batch cancel",
    /* model_formats */ "gguf",
    /* capabilities */ PB_CAP_CHAT | PB_CAP_COMPLETION | PB_CAP_TOKENIZE | PB_CAP_EMBEDDINGS | PB_CAP_TOOLS |
        PB_CAP_REASONING,
    /* load */ lib_load,
    /* model_info */ lib_model_info,
    /* unload */ lib_unload,
    /* run_create */ lib_run_create,
    /* run_execute */ lib_run_execute,
    /* run_cancel */ lib_run_cancel,
    /* run_destroy */ lib_run_destroy,
    /* count_tokens */ lib_count_tokens,
    /* embed */ lib_embed,
    /* flags */ PB_FLAG_BATCHING,
    /* probe */ lib_probe,
    /* run_create_with_inputs */ nullptr,
    /* shutdown */ lib_shutdown,
};

int lib_start(const pb_host_api *) {
    llama_log_set(forward_llama_log, nullptr);
    common_log_set_verbosity_thold(LOG_LEVEL_WARN);
    llama_backend_init();
    return 0;
}

}  // namespace

PB_PLUGIN_ENTRY(libllama_api, 0, lib_start)
