// plugin.cpp — the whisper backend's ABI table: whisper.cpp in the host's own process.
//
// Load request fields (all optional but model_path):
//   model_path (a whisper.cpp ggml model, e.g. ggml-tiny.en.bin),
//   n_parallel (transcriptions at once, each with a whisper_state of its own; 1),
//   n_threads (per transcription; 0: the machine's cores shared out among n_parallel, at most 8),
//   beam_size (0: greedy decoding with whisper.cpp's temperature fallback; 2 to 8: beam search).
// Requests: kind "transcription" only (see patchbay.h), the audio a WAV byte input.
#include "whisper_plugin.h"

extern "C" {
#include "json_reader.h"
}

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>


namespace {

void set_error(char *error, size_t size, const std::string &message) {
    plugin_set_error(error, size, "%s", message.c_str());
}

// whisper.cpp's and its ggml's own log lines: warnings and errors reach the host's log.
void forward_whisper_log(ggml_log_level level, const char *text, void *) {
    if (level != GGML_LOG_LEVEL_WARN && level != GGML_LOG_LEVEL_ERROR) return;
    if (current_run_stopping()) return;  // a cancel's abort, which whisper.cpp reports as a failure
    std::string line(text ? text : "");
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    if (!line.empty()) plugin_log(plugin_host, level == GGML_LOG_LEVEL_ERROR ? PB_LOG_ERROR : PB_LOG_WARNING, "%s", line.c_str());
}

// The request's JSON, freed on every path.
struct parsed_json {
    json_value *root;
    explicit parsed_json(const char *text) : root(json_parse(text ? text : "")) {}
    ~parsed_json() {
        if (root) json_free(root);
    }
};

bool read_integer(const json_value *request, const char *key, int64_t fallback, int64_t min, int64_t max, int64_t &out,
                  std::string &error) {
    out = fallback;
    const json_value *value = json_get(request, key);
    if (value && value->kind != JSON_NULL) {
        if (value->kind != JSON_NUMBER || std::floor(value->number) != value->number) {
            error = std::string("'") + key + "' must be an integer.";
            return false;
        }
        out = json_get_int64(request, key, fallback);
    }
    if (out >= min && out <= max) return true;
    error = std::string("'") + key + "' must be between " + std::to_string(min) + " and " + std::to_string(max) + ".";
    return false;
}

// ─── Load ────────────────────────────────────────────────────────────────────────────

pb_status read_settings(const json_value *request, load_settings &settings, std::string &error) {
    const char *path = json_get_string(request, "model_path");
    if (!path) {
        error = "'model_path' is required.";
        return PB_ERR_INVALID_REQUEST;
    }
    settings.model_path = path;
    int64_t parallel, threads, beam_size;
    if (!read_integer(request, "n_parallel", 1, 1, 16, parallel, error) ||
        !read_integer(request, "n_threads", 0, 0, 1024, threads, error) ||
        !read_integer(request, "beam_size", 0, 0, 8, beam_size, error))
        return PB_ERR_INVALID_REQUEST;
    settings.parallel = (int)parallel;
    settings.beam_size = (int)beam_size;
    int cores = (int)std::max(1u, std::thread::hardware_concurrency());
    settings.threads = threads > 0 ? (int)threads : std::max(1, std::min(8, cores / settings.parallel));
    return PB_OK;
}

void free_model(pb_model *model) {
    if (model->ctx) whisper_free(model->ctx);
    delete model;
    malloc_trim(0);  // hand the freed heap back to the system, not just to malloc
}

pb_status load_model(pb_model *model, const pb_load_callbacks *callbacks, std::string &message) {
    const load_settings &settings = model->settings;
    std::string why;
    if (!read_whisper_header(settings.model_path, model->header, why) ||
        !read_model_layout(settings.model_path, model->header, why)) {
        message = "Not a whisper.cpp model: " + settings.model_path + " (" + why + ").";
        return PB_ERR_LOAD_FAILED;
    }
    const uint64_t size = model->header.file_size;
    if (!report_load_progress(callbacks, "load", 0, size)) {
        message = "The load was cancelled.";
        return PB_ERR_CANCELLED;
    }

    bool cancelled = false;
    model->ctx = load_whisper_model(settings.model_path, model->header, callbacks, cancelled);
    if (cancelled) {
        message = "The load was cancelled.";
        return PB_ERR_CANCELLED;
    }
    if (!model->ctx) {
        message = "whisper.cpp could not load " + settings.model_path + " (see the log above for why).";
        return PB_ERR_LOAD_FAILED;
    }

    // One state made and freed: whisper.cpp sizes its compute buffers here, so a model that
    // cannot run fails now rather than at its first request.
    if (!report_load_progress(callbacks, "warmup", size, size)) {
        message = "The load was cancelled.";
        return PB_ERR_CANCELLED;
    }
    whisper_state *state = whisper_init_state(model->ctx);
    if (!state) {
        message = "whisper.cpp could not make a transcription state for " + settings.model_path +
                  " (out of memory? see the log above).";
        return PB_ERR_OUT_OF_MEMORY;
    }
    whisper_free_state(state);
    model->free_slots = settings.parallel;
    if (!report_load_progress(callbacks, "ready", size, size)) {
        message = "The load was cancelled.";
        return PB_ERR_CANCELLED;
    }
    return PB_OK;
}

pb_status lib_load(const char *request_json, const pb_load_callbacks *callbacks, pb_model **out_model, char *error,
                   size_t error_size) {
    parsed_json request(request_json);
    if (!request.root || request.root->kind != JSON_OBJECT) {
        set_error(error, error_size, "The load request is not a JSON object.");
        return PB_ERR_INVALID_REQUEST;
    }
    auto *model = new pb_model();
    std::string message;
    pb_status status = read_settings(request.root, model->settings, message);
    if (status == PB_OK) {
        FILE *file = fopen(model->settings.model_path.c_str(), "rb");
        if (file) fclose(file);
        else {
            message = "Model file not found: " + model->settings.model_path;
            status = PB_ERR_NOT_FOUND;
        }
    }
    if (status == PB_OK) {
        try {
            status = load_model(model, callbacks, message);
        } catch (const std::bad_alloc &) {
            message = "Out of memory while loading " + model->settings.model_path + ".";
            status = PB_ERR_OUT_OF_MEMORY;
        } catch (const std::exception &e) {
            message = "whisper.cpp could not load " + model->settings.model_path + ": " + e.what();
            status = PB_ERR_LOAD_FAILED;
        }
    }
    if (status != PB_OK) {
        set_error(error, error_size, message);
        free_model(model);
        return status;
    }
    const whisper_file_header &h = model->header;
    model->description = std::string(h.size_name()) + (h.multilingual() ? "" : ".en") + ", " +
                         std::to_string(h.n_audio_layer) + "+" + std::to_string(h.n_text_layer) + " layers, " +
                         std::to_string(h.n_mels) + " mels";
    plugin_log(plugin_host, PB_LOG_INFO, "loaded %s: whisper %s, %d parallel, %d threads each, %s decoding",
               model->settings.model_path.c_str(), model->description.c_str(), model->settings.parallel,
               model->settings.threads,
               model->settings.beam_size > 1 ? ("beam " + std::to_string(model->settings.beam_size)).c_str() : "greedy");
    *out_model = model;
    return PB_OK;
}

void lib_model_info(pb_model *model, pb_model_info *info) {
    if (PB_HAS(info, context_length)) info->context_length = model->header.n_text_ctx;
    if (PB_HAS(info, capabilities)) info->capabilities = PB_CAP_TRANSCRIPTION | PB_CAP_AUDIO_INPUT;
    if (PB_HAS(info, parallel_slots)) info->parallel_slots = model->settings.parallel;
    if (PB_HAS(info, training_context_length)) info->training_context_length = model->header.n_text_ctx;
    if (PB_HAS(info, size_bytes)) info->size_bytes = model->header.file_size;
    if (PB_HAS(info, architecture)) info->architecture = "whisper";
}

void lib_unload(pb_model *model) {
    std::string path = model->settings.model_path;
    free_model(model);
    plugin_log(plugin_host, PB_LOG_INFO, "unloaded %s", path.c_str());
}

// ─── Runs ────────────────────────────────────────────────────────────────────────────

// The language id of an ISO 639-1 code or an English name ("en", "english"); -1 when
// whisper.cpp knows neither. (whisper_lang_id would log an unknown one as an engine error.)
int find_language(const std::string &name) {
    std::string lower(name);
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return (char)std::tolower(c); });
    for (int id = 0; id <= whisper_lang_max_id(); id++) {
        const char *code = whisper_lang_str(id), *full = whisper_lang_str_full(id);
        if ((code && lower == code) || (full && lower == full)) return id;
    }
    return -1;
}

pb_status read_request(pb_model *model, const json_value *request, const pb_byte_input *const *inputs,
                       size_t input_count, transcription_request &out, std::string &error) {
    const char *kind = json_get_string(request, "kind");
    if (!kind || strcmp(kind, "transcription") != 0) {
        error = std::string("The whisper backend only transcribes audio (kind \"transcription\"); it cannot serve kind \"") +
                (kind ? kind : "") + "\".";
        return PB_ERR_UNSUPPORTED;
    }
    const char *name = json_get_string(json_get(request, "audio"), "input");
    if (!name) {
        error = "A transcription needs 'audio': {\"input\": NAME}, naming the byte input that holds the audio.";
        return PB_ERR_INVALID_REQUEST;
    }
    const pb_byte_input *audio = nullptr;
    for (size_t i = 0; i < input_count && inputs && !audio; i++) {
        const pb_byte_input *input = inputs[i];
        if (input && PB_HAS(input, size) && input->name && strcmp(input->name, name) == 0) audio = input;
    }
    if (!audio) {
        error = std::string("The byte input '") + name + "' that 'audio' names was not sent with the request.";
        return PB_ERR_INVALID_REQUEST;
    }
    if (!wav_parse(audio->data, audio->size, out.audio, error)) return PB_ERR_INVALID_REQUEST;

    const char *language = json_get_string(request, "language");
    if (language && *language && strcmp(language, "auto") != 0) {
        int id = find_language(language);
        if (id < 0) {
            error = std::string("Unknown language '") + language + "': an ISO 639-1 code such as \"en\" is expected.";
            return PB_ERR_INVALID_REQUEST;
        }
        out.language = whisper_lang_str(id);
        if (!model->header.multilingual() && out.language != "en") {
            error = "This model (" + model->description + ") transcribes English only; it cannot transcribe '" +
                    out.language + "'.";
            return PB_ERR_INVALID_REQUEST;
        }
    }
    if (const char *prompt = json_get_string(request, "prompt")) out.prompt = prompt;
    const json_value *temperature = json_get(request, "temperature");
    if (temperature && temperature->kind != JSON_NULL) {
        if (temperature->kind != JSON_NUMBER || !(temperature->number >= 0 && temperature->number <= 1)) {
            error = "'temperature' must be a number between 0 and 1.";
            return PB_ERR_INVALID_REQUEST;
        }
        out.temperature = (float)temperature->number;
    }
    if (!read_integer(request, "max_wall_ms", 0, 0, INT64_MAX, out.max_wall_ms, error)) return PB_ERR_INVALID_REQUEST;
    if (const char *id = json_get_string(request, "request_id")) out.request_id = id;
    return PB_OK;
}

pb_status lib_run_create_with_inputs(pb_model *model, const char *request_json, const pb_byte_input *const *inputs,
                                     size_t input_count, pb_run **out_run, char *error, size_t error_size) {
    parsed_json request(request_json);
    if (!request.root || request.root->kind != JSON_OBJECT) {
        set_error(error, error_size, "The request is not a JSON object.");
        return PB_ERR_INVALID_REQUEST;
    }
    auto *run = new pb_run();
    run->model = model;
    std::string message;
    pb_status status = read_request(model, request.root, inputs, input_count, run->request, message);
    if (status != PB_OK) {
        set_error(error, error_size, message);
        delete run;
        return status;
    }
    *out_run = run;
    return PB_OK;
}

// Without byte inputs there is no audio: the host calls the function above instead for
// every run (this one stays in the table because the ABI requires it).
pb_status lib_run_create(pb_model *model, const char *request_json, pb_run **out_run, char *error, size_t error_size) {
    return lib_run_create_with_inputs(model, request_json, nullptr, 0, out_run, error, error_size);
}

void lib_run_execute(pb_run *run, const pb_event_sink *sink) {
    run->sink = sink;
    if (run->request.max_wall_ms > 0) {
        run->has_deadline = true;
        run->deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(run->request.max_wall_ms);
    }
    run_transcription(run);
}

void lib_run_cancel(pb_run *run) {
    if (run->cancelled.exchange(true)) return;
    run->cancel_ns.store(now_ns());
    // A run waiting for a slot wakes and ends; a computing one stops at its next graph node.
    pb_model *model = run->model;
    { std::lock_guard<std::mutex> lock(model->mutex); }
    model->slot_freed.notify_all();
}

void lib_run_destroy(pb_run *run) { delete run; }

// ─── The table ───────────────────────────────────────────────────────────────────────

// A whisper.cpp ggml file: the legacy magic and the hyper-parameters of a Whisper model.
// Never GGUF (that is llama.cpp's), and 80 rather than 100, for a converted file is
// legacy ggml whose header cannot prove more.
int32_t lib_probe(const char *model_path, char *detail, size_t detail_size) {
    whisper_file_header header;
    std::string why;
    if (!model_path || !read_whisper_header(model_path, header, why)) {
        set_error(detail, detail_size, why);
        return 0;
    }
    set_error(detail, detail_size, std::string("whisper.cpp ggml model (") + header.size_name() +
                                       (header.multilingual() ? ", multilingual" : ", English only") + ")");
    return 80;
}

const pb_plugin_api whisper_api = {
    /* struct_size */ sizeof(pb_plugin_api),
    /* abi_major */ PB_ABI_VERSION_MAJOR,
    /* abi_minor */ PB_ABI_VERSION_MINOR,
    /* name */ "whisper",
    /* version */ "1.0.0",
    /* description */ "whisper.cpp in-process (ggml Whisper models): speech to text from WAV audio",
    /* model_formats */ "bin",
    /* capabilities */ PB_CAP_TRANSCRIPTION | PB_CAP_AUDIO_INPUT,
    /* load */ lib_load,
    /* model_info */ lib_model_info,
    /* unload */ lib_unload,
    /* run_create */ lib_run_create,
    /* run_execute */ lib_run_execute,
    /* run_cancel */ lib_run_cancel,
    /* run_destroy */ lib_run_destroy,
    /* count_tokens */ nullptr,
    /* embed */ nullptr,
    /* flags */ 0,  // one host thread per run: on_event may block
    /* probe */ lib_probe,
    /* run_create_with_inputs */ lib_run_create_with_inputs,
    /* shutdown */ nullptr,
};

int lib_start(const pb_host_api *) {
    whisper_log_set(forward_whisper_log, nullptr);
    return 0;
}

}  // namespace

// Transcription and byte inputs came with ABI 1.1: an older host is refused.
PB_PLUGIN_ENTRY(whisper_api, 1, lib_start)
