// whisper_plugin.h — the whisper.cpp backend's types, shared by its files:
//   plugin.cpp      the ABI table: probe, load, unload, runs (requests read and checked)
//   model_file.cpp  the ggml model file: its header (probe) and the loader that reports
//                   progress and honours a cancelled load
//   engine.cpp      one transcription: audio in, whisper_full_with_state, events out, cancel
//   mel.cpp         the log-mel spectrogram whisper.cpp would make, but interruptible
//   audio.cpp       WAV in, 16 kHz mono float out
#pragma once

#include "audio.h"
#include "patchbay.h"
extern "C" {
#include "plugin_events.h"  // plugin_host, plugin_emit, PB_PLUGIN_ENTRY: shared with the C plugins
#include "plugin_util.h"    // plugin_log, plugin_set_error
}

#include "whisper.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

using steady_time = std::chrono::steady_clock::time_point;

// What the load request chose.
struct load_settings {
    std::string model_path;
    int parallel = 1;  // transcriptions at once: one whisper_state each
    int threads = 0;   // per transcription; 0: the cores shared out among the parallel runs
    int beam_size = 0; // 0 or 1: greedy decoding; more: beam search with this many beams
};

// The hyper-parameters at the head of a whisper.cpp ggml file.
struct whisper_file_header {
    int32_t n_vocab = 0, n_audio_ctx = 0, n_audio_state = 0, n_audio_head = 0, n_audio_layer = 0;
    int32_t n_text_ctx = 0, n_text_state = 0, n_text_head = 0, n_text_layer = 0, n_mels = 0, ftype = 0;
    uint64_t file_size = 0;
    uint64_t tensors_start = 0;      // where the tensor records begin (read_model_layout)
    std::vector<float> mel_filters;  // n_mels × (1 + WHISPER_N_FFT / 2) (read_model_layout)
    bool multilingual() const { return n_vocab >= 51865; }
    const char *size_name() const;  // "tiny", "base", …
};

// model_file.cpp
// Reads and checks the header. Returns false with `why` (one line) when the file is not a
// whisper.cpp model: not legacy ggml, GGUF, or hyper-parameters no Whisper model has.
bool read_whisper_header(const std::string &path, whisper_file_header &header, std::string &why);
// Reads the mel filter bank and walks the vocabulary to find where the tensors begin.
bool read_model_layout(const std::string &path, whisper_file_header &header, std::string &why);
// whisper_init_with_params_no_state from the file, reporting load progress to the host.
// Returns null with `cancelled` set when the host cancelled the load (whatever whisper.cpp
// made is freed), or null when whisper.cpp could not load the file (it logged why).
whisper_context *load_whisper_model(const std::string &path, const whisper_file_header &header,
                                    const pb_load_callbacks *callbacks, bool &cancelled);
// A progress report to the host; returns false when the host cancelled the load.
bool report_load_progress(const pb_load_callbacks *callbacks, const char *phase, uint64_t loaded, uint64_t total);

// mel.cpp
struct mel_spectrogram {
    int n_mel = 0;
    int n_len = 0;      // frames, with the 30 s of silence whisper.cpp pads
    int n_len_org = 0;  // frames of the audio itself
    std::vector<float> data;  // n_mel rows of n_len
};
// Returns false, with nothing made, when `stop` said so (asked every 64 frames).
bool compute_mel(const std::vector<float> &samples, const std::vector<float> &filters, int n_mel, int threads,
                 const std::function<bool()> &stop, mel_spectrogram &mel);

struct pb_model {
    load_settings settings;
    whisper_file_header header;
    whisper_context *ctx = nullptr;
    std::string description;  // for messages: "tiny.en, 4+4 layers, 80 mels"

    // n_parallel transcriptions run at once, each with a whisper_state of its own, made for
    // the run and freed after it: a state reused by the next run would carry its decoder's
    // random generator (and so its fallback decoding) over, so equal requests would differ.
    std::mutex mutex;  // guards free_slots and waiting
    std::condition_variable slot_freed;  // also notified by run_cancel, to end a waiting run
    int free_slots = 0;
    std::deque<pb_run *> waiting;  // runs waiting for a slot, in arrival order
};

// A transcription request, read and checked at run_create.
struct transcription_request {
    wav_info audio;            // points into the host's byte input (valid until run_destroy)
    std::string language;      // ISO 639-1 code; empty: detect (multilingual models)
    std::string prompt;        // whisper's initial prompt; empty: none
    float temperature = 0.0f;  // the first decoding temperature (whisper falls back higher)
    int64_t max_wall_ms = 0;
    std::string request_id;    // the host's id for the HTTP request, named in log lines
};

// Where a run is, for the cancel log line.
enum class run_phase : int { created, reading_audio, waiting, spectrogram, language_detection, encoder, decoder, ended };

// One transcription: created by run_create, executed on the host's thread by run_execute,
// freed by run_destroy. run_cancel touches only the atomics (and wakes a waiting run).
struct pb_run {
    pb_model *model = nullptr;
    transcription_request request;

    std::atomic<bool> cancelled{false};
    std::atomic<int64_t> cancel_ns{0};  // steady-clock time of the first cancel call
    std::atomic<run_phase> phase{run_phase::created};

    // Set by run_execute, used only on its thread.
    const pb_event_sink *sink = nullptr;
    steady_time deadline{};
    bool has_deadline = false;
    std::atomic<bool> timed_out{false}; // max_wall_ms passed: the engine was told to stop
    int64_t audio_ms = 0;
    int64_t processed_ms = 0;           // audio transcribed so far, for progress events
    int64_t last_event_ns = 0;          // for the progress heartbeat
    int segments = 0;
    int64_t text_tokens = 0;
    std::string utf8_carry;             // a character split between two segments
};

// engine.cpp
void run_transcription(pb_run *run);  // run_execute's body: ends with the terminal event
// Whether this thread's run is being stopped on purpose: whisper.cpp then logs the abort as
// a failure, which it is not for us, so those lines stay out of the host's log.
bool current_run_stopping();
int64_t now_ns();
