// engine.cpp — one transcription, on the thread that called run_execute.
//
//   1. the WAV bytes are decoded to 16 kHz mono floats;
//   2. the run takes one of the model's n_parallel slots (first come, first served) and
//      makes a whisper_state of its own for it;
//   3. the language is the request's, "en" for an English-only model, or detected;
//   4. whisper_full_with_state runs, and every segment goes out as it is decoded.
//
// Stopping. whisper.cpp 1.8.5 asks its abort callback only between graphs: after the whole
// encoder of a 30-second window (over a second on a small CPU) and after each decoder step.
// To stop within one graph node instead, the plugin is linked with
// --wrap=ggml_backend_sched_graph_compute: every graph whisper.cpp computes passes through
// the wrapper below first, which gives the compute backends an abort callback for the run
// of the calling thread. ggml asks it after each node, in the encoder and the decoder alike.
#include "whisper_plugin.h"

#include "ggml-backend.h"

#include <algorithm>

namespace {

using clock_type = std::chrono::steady_clock;

// The run whose whisper.cpp calls this thread is making (null: none).
thread_local pb_run *t_current_run = nullptr;

constexpr int64_t heartbeat_ns = 1000000000;  // PB_EVENT_PROGRESS at least every second

// ─── Events ──────────────────────────────────────────────────────────────────────────

void emit(pb_run *run, pb_event &event) {
    run->last_event_ns = now_ns();
    plugin_emit(run->sink, &event);
}

void emit_progress(pb_run *run, int64_t processed_ms) {
    pb_event event{};
    event.type = PB_EVENT_PROGRESS;  // for a transcription: milliseconds of audio, of the total
    event.progress_processed = processed_ms;
    event.progress_total = run->audio_ms;
    emit(run, event);
}

// Keeps the host informed during long silent work (an encoder pass, a wait for a state).
void heartbeat(pb_run *run, int64_t processed_ms) {
    if (now_ns() - run->last_event_ns >= heartbeat_ns) emit_progress(run, processed_ms);
}

void emit_language(pb_run *run, const std::string &code, double probability) {
    pb_event event{};
    event.type = PB_EVENT_LANGUAGE;
    event.text = code.data();
    event.text_len = code.size();
    event.language_probability = probability;
    emit(run, event);
}

void emit_usage(pb_run *run) {
    pb_event event{};
    event.type = PB_EVENT_USAGE;
    event.completion_tokens = run->text_tokens;
    emit(run, event);
}

void end_with_finish(pb_run *run, pb_finish_reason reason) {
    pb_event event{};
    event.type = PB_EVENT_FINISH;
    event.finish_reason = reason;
    emit(run, event);
}

void end_with_error(pb_run *run, pb_status code, const std::string &message) {
    pb_event event{};
    event.type = PB_EVENT_ERROR;
    event.error_code = code;
    event.text = message.data();
    event.text_len = message.size();
    emit(run, event);
}

// The bytes of `text` that end on a character boundary. whisper.cpp's tokens are bytes, so
// a segment can end inside a character: its first bytes wait in `carry` for the next
// segment. Bytes that can never be UTF-8 become U+FFFD.
std::string whole_characters(const std::string &text, std::string &carry) {
    std::string out;
    out.reserve(text.size());
    carry.clear();
    size_t i = 0;
    while (i < text.size()) {
        const unsigned char c = (unsigned char)text[i];
        size_t n = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 && c >= 0xc2 ? 2 : (c & 0xf0) == 0xe0 ? 3
                             : (c & 0xf8) == 0xf0 && c <= 0xf4 ? 4 : 0;
        size_t k = 1;
        while (n > 1 && k < n && i + k < text.size() && ((unsigned char)text[i + k] & 0xc0) == 0x80) k++;
        if (n > 1 && k < n && i + k == text.size()) {  // a character cut off at the end
            carry = text.substr(i);
            break;
        }
        if (n == 0 || k < n) {
            out += "\xef\xbf\xbd";
            i++;
            continue;
        }
        out.append(text, i, n);
        i += n;
    }
    return out;
}

// ─── Stopping ────────────────────────────────────────────────────────────────────────

// Whether the engine should stop working on the run now: it was cancelled, or its
// wall-clock budget is spent.
bool should_stop(pb_run *run) {
    if (run->cancelled.load(std::memory_order_relaxed)) return true;
    if (run->has_deadline && clock_type::now() >= run->deadline) {
        run->timed_out = true;
        return true;
    }
    return false;
}

// ggml's abort callback, asked after every graph node (see the top).
bool abort_between_nodes(void *data) {
    auto *run = static_cast<pb_run *>(data);
    if (should_stop(run)) return true;
    heartbeat(run, run->processed_ms);
    return false;
}

const char *phase_name(run_phase phase) {
    switch (phase) {
    case run_phase::created: return "before execution";
    case run_phase::reading_audio: return "while reading the audio";
    case run_phase::waiting: return "while waiting for a slot";
    case run_phase::spectrogram: return "during spectrogram";
    case run_phase::language_detection: return "during language detection";
    case run_phase::encoder: return "during encoder";
    case run_phase::decoder: return "during decoder";
    case run_phase::ended: return "after the transcription ended";
    }
    return "";
}

// How long after its cancel call the engine stopped working on the run, logged as the
// libllama plugin does so that the benchmark and the tests read both alike.
void log_cancel(pb_run *run, int64_t stopped_ns) {
    int64_t cancel_ns = run->cancel_ns.load();
    double latency = cancel_ns > 0 ? std::max<int64_t>(0, stopped_ns - cancel_ns) / 1e6 : 0;
    plugin_log(plugin_host, PB_LOG_INFO, "run cancelled: engine stopped %.2f ms after the cancel call (%s, %d segments decoded)%s%s",
               latency, phase_name(run->phase.load()), run->segments, run->request.request_id.empty() ? "" : " request ",
               run->request.request_id.c_str());
}

// ─── whisper.cpp's callbacks ─────────────────────────────────────────────────────────

// Before each 30-second window's encoder pass.
bool on_encoder_begin(whisper_context *, whisper_state *, void *data) {
    auto *run = static_cast<pb_run *>(data);
    run->phase = run_phase::encoder;
    if (should_stop(run)) return false;
    heartbeat(run, run->processed_ms);
    return true;
}

// whisper.cpp's own abort check: after the encoder pass and after each decoder step, so
// whatever comes next is decoding.
bool on_abort_check(void *data) {
    auto *run = static_cast<pb_run *>(data);
    if (should_stop(run)) return true;
    run->phase = run_phase::decoder;
    heartbeat(run, run->processed_ms);
    return false;
}

void on_progress(whisper_context *, whisper_state *, int percent, void *data) {
    auto *run = static_cast<pb_run *>(data);
    run->processed_ms = run->audio_ms * std::min(100, std::max(0, percent)) / 100;
}

// Every segment goes out as soon as its window is decoded.
void on_new_segments(whisper_context *ctx, whisper_state *state, int n_new, void *data) {
    auto *run = static_cast<pb_run *>(data);
    const int n = whisper_full_n_segments_from_state(state);
    const whisper_token eot = whisper_token_eot(ctx);  // text tokens come before it; specials and timestamps after
    for (int i = std::max(0, n - n_new); i < n; i++) {
        const int n_tokens = whisper_full_n_tokens_from_state(state, i);
        for (int j = 0; j < n_tokens; j++)
            if (whisper_full_get_token_id_from_state(state, i, j) < eot) run->text_tokens++;
        std::string raw = run->utf8_carry + whisper_full_get_segment_text_from_state(state, i);
        std::string text = whole_characters(raw, run->utf8_carry);
        pb_event event{};
        event.type = PB_EVENT_SEGMENT;
        event.text = text.data();
        event.text_len = text.size();
        // t0/t1 count 10 ms steps; the last segment of a window can claim the whole 30 s
        // window, past the end of the audio.
        event.segment_start_ms = std::min(run->audio_ms, whisper_full_get_segment_t0_from_state(state, i) * 10);
        event.segment_end_ms = std::min(run->audio_ms, whisper_full_get_segment_t1_from_state(state, i) * 10);
        emit(run, event);
        run->segments++;
        run->processed_ms = std::max(run->processed_ms, event.segment_end_ms);
    }
}

// ─── Slots ───────────────────────────────────────────────────────────────────────────

// Takes one of the model's slots, first come first served, sending progress while it waits.
// Returns false when the run was cancelled or ran out of time meanwhile.
bool acquire_slot(pb_run *run) {
    pb_model *model = run->model;
    std::unique_lock<std::mutex> lock(model->mutex);
    model->waiting.push_back(run);
    for (;;) {
        if (model->waiting.front() == run && model->free_slots > 0) {
            model->free_slots--;
            model->waiting.pop_front();
            model->slot_freed.notify_all();  // the next in line may find a slot too
            return true;
        }
        if (should_stop(run)) {
            model->waiting.erase(std::find(model->waiting.begin(), model->waiting.end(), run));
            model->slot_freed.notify_all();
            return false;
        }
        run->phase = run_phase::waiting;
        auto wake = clock_type::now() + std::chrono::seconds(1);
        if (run->has_deadline) wake = std::min(wake, run->deadline);
        model->slot_freed.wait_until(lock, wake);
        if (now_ns() - run->last_event_ns >= heartbeat_ns) {
            lock.unlock();  // the sink may block; never while holding the model's lock
            emit_progress(run, 0);
            lock.lock();
        }
    }
}

void release_slot(pb_model *model) {
    {
        std::lock_guard<std::mutex> lock(model->mutex);
        model->free_slots++;
    }
    model->slot_freed.notify_all();
}

// The run's slot, state and thread-local registration, given back however it ends.
struct run_scope {
    pb_run *run;
    whisper_state *state = nullptr;
    explicit run_scope(pb_run *r) : run(r) { t_current_run = r; }
    ~run_scope() {
        t_current_run = nullptr;
        if (state) whisper_free_state(state);
        release_slot(run->model);
    }
};

// ─── The transcription ───────────────────────────────────────────────────────────────

struct outcome {
    pb_status code = PB_OK;     // an error to end the run with (unless it was stopped on purpose)
    std::string message;
    int64_t stopped_ns = 0;     // when whisper.cpp returned
    void fail(const char *during, int status) {
        code = PB_ERR_INTERNAL;
        message = std::string("whisper.cpp failed during ") + during + " (status " + std::to_string(status) +
                  "; see the log).";
    }
};

// The language, detected by whisper.cpp over the first 30 seconds when the request names
// none and the model is multilingual; the detector's probability goes to the host too.
bool choose_language(pb_run *run, whisper_state *state, std::string &code, double &probability, outcome &result) {
    pb_model *model = run->model;
    probability = 0;
    if (!run->request.language.empty()) {
        code = run->request.language;
        return true;
    }
    code = "en";
    if (!model->header.multilingual()) return true;
    run->phase = run_phase::language_detection;
    std::vector<float> probabilities(whisper_lang_max_id() + 1, 0.0f);
    int id = whisper_lang_auto_detect_with_state(model->ctx, state, 0, model->settings.threads, probabilities.data());
    if (id < 0) {
        result.fail("language detection", id);
        result.stopped_ns = now_ns();
        return false;
    }
    code = whisper_lang_str(id);
    probability = probabilities[id];
    return true;
}

outcome transcribe(pb_run *run, whisper_state *state, const std::vector<float> &samples) {
    pb_model *model = run->model;
    outcome result;
    std::string language = run->request.language.empty() ? "en" : run->request.language;
    double probability = 0;
    // whisper.cpp ignores audio shorter than 100 ms: nothing to transcribe, nothing to detect.
    if (samples.size() < WHISPER_SAMPLE_RATE / 10) {
        emit_language(run, language, 0);
        return result;
    }
    // The spectrogram is made here rather than inside whisper_full: by mel.cpp, which a
    // cancel stops, and once for both language detection and transcription.
    run->phase = run_phase::spectrogram;
    int audio_frames = 0;
    {
        mel_spectrogram mel;
        if (!compute_mel(samples, model->header.mel_filters, model->header.n_mels, model->settings.threads,
                         [run] { return should_stop(run); }, mel)) {
            result.stopped_ns = now_ns();
            return result;
        }
        int status = whisper_set_mel_with_state(model->ctx, state, mel.data.data(), mel.n_len, mel.n_mel);
        if (status != 0) {
            result.fail("the spectrogram", status);
            result.stopped_ns = now_ns();
            return result;
        }
        audio_frames = mel.n_len_org;
    }
    if (should_stop(run) || !choose_language(run, state, language, probability, result) || should_stop(run)) {
        result.stopped_ns = now_ns();
        return result;
    }
    emit_language(run, language, probability);

    const load_settings &settings = model->settings;
    whisper_full_params params = whisper_full_default_params(settings.beam_size > 1 ? WHISPER_SAMPLING_BEAM_SEARCH
                                                                                    : WHISPER_SAMPLING_GREEDY);
    params.n_threads = settings.threads;
    params.beam_search.beam_size = std::max(1, settings.beam_size);
    params.no_context = true;  // never conditioned on the text of this state's previous run
    params.print_progress = params.print_realtime = params.print_timestamps = params.print_special = false;
    params.duration_ms = audio_frames * 10;  // set_mel counts the padding as audio; this does not
    params.language = language.c_str();
    params.detect_language = false;
    params.initial_prompt = run->request.prompt.empty() ? nullptr : run->request.prompt.c_str();
    params.temperature = run->request.temperature;  // whisper.cpp still falls back to higher ones
    params.new_segment_callback = on_new_segments;
    params.new_segment_callback_user_data = run;
    params.progress_callback = on_progress;
    params.progress_callback_user_data = run;
    params.encoder_begin_callback = on_encoder_begin;
    params.encoder_begin_callback_user_data = run;
    params.abort_callback = on_abort_check;
    params.abort_callback_user_data = run;

    run->phase = run_phase::encoder;
    int status = whisper_full_with_state(model->ctx, state, params, nullptr, 0);  // the spectrogram is in the state
    result.stopped_ns = now_ns();
    if (status != 0) result.fail("the transcription", status);
    return result;
}

// Usage and the terminal event, once whisper.cpp returned: a stop on purpose (cancel, time
// limit) is not an error, even though whisper.cpp reports it as one.
void end_transcription(pb_run *run, const outcome &result) {
    if (run->cancelled.load()) {
        log_cancel(run, result.stopped_ns ? result.stopped_ns : now_ns());
        emit_usage(run);
        end_with_finish(run, PB_FINISH_CANCELLED);
    } else if (run->timed_out) {
        plugin_log(plugin_host, PB_LOG_INFO, "run stopped at its time limit (%s, %d segments decoded)",
                   phase_name(run->phase.load()), run->segments);
        emit_usage(run);
        end_with_finish(run, PB_FINISH_TIME_LIMIT);
    } else if (result.code != PB_OK) {
        end_with_error(run, result.code, result.message);
    } else {
        run->phase = run_phase::ended;
        emit_usage(run);
        end_with_finish(run, PB_FINISH_STOP);
    }
}

}  // namespace

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count();
}

bool current_run_stopping() {
    pb_run *run = t_current_run;
    return run && (run->cancelled.load() || run->timed_out);
}

void run_transcription(pb_run *run) {
    run->last_event_ns = now_ns();
    if (run->cancelled.load()) {
        log_cancel(run, now_ns());
        end_with_finish(run, PB_FINISH_CANCELLED);
        return;
    }

    // The audio (checked at run_create, so only memory can fail here).
    run->phase = run_phase::reading_audio;
    std::vector<float> samples;
    try {
        samples = wav_to_mono(run->request.audio, WHISPER_SAMPLE_RATE, &run->cancelled);
    } catch (const std::bad_alloc &) {
        end_with_error(run, PB_ERR_OUT_OF_MEMORY, "Out of memory while decoding the audio.");
        return;
    }
    run->audio_ms = (int64_t)samples.size() * 1000 / WHISPER_SAMPLE_RATE;

    if (should_stop(run) || !acquire_slot(run)) {
        if (run->cancelled.load()) {
            log_cancel(run, now_ns());
            end_with_finish(run, PB_FINISH_CANCELLED);
        } else {
            end_with_finish(run, PB_FINISH_TIME_LIMIT);
        }
        return;
    }

    // The slot and the state are given back after the terminal event, so that freeing the
    // state (a few milliseconds) never delays the answer to a cancel.
    run_scope scope(run);
    outcome result;
    try {
        scope.state = whisper_init_state(run->model->ctx);
        if (!scope.state) throw std::bad_alloc();
        result = transcribe(run, scope.state, samples);
    } catch (const std::bad_alloc &) {
        result.code = PB_ERR_OUT_OF_MEMORY;
        result.message = "Out of memory during the transcription.";
    } catch (const std::exception &e) {
        result.code = PB_ERR_INTERNAL;
        result.message = std::string("whisper.cpp failed: ") + e.what();
    }
    end_transcription(run, result);
}

// ─── The compute hook (see the top) ──────────────────────────────────────────────────

extern "C" {
ggml_status __real_ggml_backend_sched_graph_compute(ggml_backend_sched_t sched, ggml_cgraph *graph);

ggml_status __wrap_ggml_backend_sched_graph_compute(ggml_backend_sched_t sched, ggml_cgraph *graph) {
    pb_run *run = t_current_run;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); i++) {
        ggml_backend_t backend = ggml_backend_sched_get_backend(sched, i);
        ggml_backend_dev_t device = ggml_backend_get_device(backend);
        ggml_backend_reg_t reg = device ? ggml_backend_dev_backend_reg(device) : nullptr;
        auto set_abort = reg ? (ggml_backend_set_abort_callback_t)ggml_backend_reg_get_proc_address(
                                   reg, "ggml_backend_set_abort_callback")
                             : nullptr;
        if (set_abort) set_abort(backend, run ? abort_between_nodes : nullptr, run);
    }
    return __real_ggml_backend_sched_graph_compute(sched, graph);
}
}
