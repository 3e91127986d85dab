// libllama.h — the in-process llama.cpp backend's types, shared by its three files:
//   plugin.cpp  the ABI table: load, unload, probe, runs, token counting, embeddings
//   prompt.cpp  a normalized request into prompt tokens and generation settings, through
//               the very functions llama-server uses (so both backends agree)
//   engine.cpp  the batching engine: one thread per model decoding every slot together
#pragma once

#include "patchbay.h"
extern "C" {
#include "plugin_events.h"  // plugin_host, plugin_emit, PB_PLUGIN_ENTRY: shared with the C plugins
#include "plugin_util.h"    // plugin_log, plugin_set_error
}

#include "chat.h"
#include "llama.h"
#include "sampling.h"
#include "server-common.h"
#include "server-task.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using steady_time = std::chrono::steady_clock::time_point;

// What the load request chose.
struct load_settings {
    std::string model_path;
    std::string chat_template_override;
    int64_t context_size = 0;
    bool kv_unified = false;  // one KV cache shared by the slots, instead of one per slot
    int parallel = 4;       // slots
    int batch = 128;        // logical batch: the largest prompt chunk one step decodes
    int ubatch = 128;       // physical batch
    int threads = 0;        // 0: llama.cpp's default (the math cores)
    int gpu_layers = -1;    // -1: all that fit, where the build has a GPU backend
    ggml_type cache_type = GGML_TYPE_F16;
    std::string pooling = "mean";  // for embeddings
};

// One request, prepared at run_create: the prompt's tokens and how to generate.
struct prepared_request {
    bool is_chat = false;
    std::vector<llama_token> prompt;
    task_params params;       // sampling, stop strings, n_predict, chat parsing, as llama-server reads them
    common_sampler *sampler = nullptr;  // made from `params` at run_create (a bad grammar is a 400 there)
    int64_t max_wall_ms = 0;
    std::string request_id;   // the host's id for the HTTP request, named in log lines
};

struct pb_model;

// One generation: created by run_create, handed to the engine by run_execute, freed by
// run_destroy. The engine thread owns everything below `engine-owned` while the run is in
// a slot; run_cancel touches only the atomics.
struct pb_run {
    pb_model *model = nullptr;
    prepared_request request;

    std::atomic<bool> cancelled{false};
    std::atomic<int64_t> cancel_ns{0};   // steady-clock time of the first cancel call

    // Set by run_execute; the engine delivers events through it.
    const pb_event_sink *sink = nullptr;
    steady_time deadline{};             // max_wall_ms from the start of execution
    bool has_deadline = false;
    steady_time waiting_since{};        // engine-owned: when it last heard of this run while it waited

    // Signalled by the engine when the terminal event went out.
    std::mutex done_mutex;
    std::condition_variable done_cv;
    bool done = false;
};

// One engine slot: a sequence in the shared KV cache.
struct slot {
    int id = 0;                             // its llama_seq_id
    pb_run *run = nullptr;                  // null: free
    std::vector<llama_token> cache;         // the tokens in the KV cache for this sequence

    // engine-owned state of the current run
    enum { idle, prefill, generating } state = idle;
    size_t n_prompt_done = 0;               // prompt tokens in the cache
    size_t n_cached = 0;                    // of those, reused from the previous run
    int n_generated = 0;
    llama_token next_token = -1;            // sampled, to be decoded next step
    common_sampler *sampler = nullptr;
    std::unique_ptr<task_result_state> chat_state;  // incremental tool-call / reasoning parsing
    std::string generated;                  // all text so far (stop strings are cut from it)
    size_t n_sent = 0;                      // bytes of `generated` already delivered
    std::string stop_word;                  // the stop string that ended the run
    int stop_kind = 0;                      // 0 none, 1 EOS, 2 stop string, 3 length
    steady_time t_start{}, t_prompt_done{}, t_last_progress{};
    int64_t last_compute_ns = 0;            // when a decode holding this slot's tokens last ended
    uint64_t last_used = 0;                 // for choosing which cache to overwrite
};

struct pb_model {
    load_settings settings;
    common_init_result_ptr init;            // owns the model and the context, loaded as llama-server does
    llama_model *model = nullptr;
    llama_context *ctx = nullptr;
    const llama_vocab *vocab = nullptr;
    server_chat_params chat;                // chat templates and their defaults, as llama-server's
    common_params params_base;              // llama-server's defaults for a request's settings
    std::vector<llama_logit_bias> logit_bias_eog;
    std::string architecture;
    int64_t context_length = 0;

    // The engine.
    std::thread engine_thread;
    std::mutex mutex;                       // guards `waiting`, `stopping` and slot assignment
    std::condition_variable wake;
    std::deque<pb_run *> waiting;           // executed runs without a slot, first come first served
    bool stopping = false;
    std::vector<slot> slots;
    std::atomic<pb_run *> prefilling{nullptr};  // the run whose prompt chunk is computing (abort callback)
    std::atomic<bool> aborting{false};          // unload: abort whatever computes
    std::atomic<bool> abort_noted{false};       // the abort callback said yes during the current decode
    uint64_t step = 0;

    // Embeddings: a second context, made on first use.
    std::mutex embed_mutex;
    llama_context *embed_ctx = nullptr;
};

// engine.cpp
// How many decodes are being aborted on purpose right now: llama.cpp logs an abort as a
// failure, which it is not for us, so those lines stay out of the host's log meanwhile.
extern std::atomic<int> g_deliberate_aborts;
void engine_start(pb_model *model);
void engine_stop(pb_model *model);        // ends every run (cancelled) and joins the thread
void engine_submit(pb_model *model, pb_run *run);
void engine_wake(pb_model *model);

// prompt.cpp
// Reads a normalized request into `out`. Returns PB_OK or an error with `error` filled.
pb_status prepare_request(pb_model *model, const std::string &request_json, bool for_counting,
                          prepared_request &out, std::string &error);
// The longest prefix of `b` that `a` starts with, in tokens.
size_t common_prefix(const std::vector<llama_token> &a, const std::vector<llama_token> &b);
