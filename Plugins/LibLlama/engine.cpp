// engine.cpp — continuous batching: one thread per model decodes every slot together.
//
// Each turn of the loop:
//   1. admits waiting runs into free slots (the slot whose cached tokens share the longest
//      prefix with the new prompt, so a multi-turn chat does not re-process its history),
//      and ends runs that were cancelled or ran out of wall-clock time;
//   2. decodes one token for every generating slot, in one batch;
//   3. processes one chunk (at most n_batch tokens) of one prompt, in a batch of its own.
// A long prompt therefore never freezes the others' decoding for longer than one chunk,
// and a prompt chunk holds only its own run's tokens, so llama.cpp's abort callback can
// stop it mid-computation on that run's cancel without touching anyone else's work.
//
// Events go out from this thread only. The host's sink never blocks (PB_FLAG_BATCHING);
// a run whose client is behind (backlog at its limit) simply sits out decode steps.
#include "libllama.h"

#include <algorithm>
#include <cmath>

std::atomic<int> g_deliberate_aborts{0};

namespace {

using clock_type = std::chrono::steady_clock;
using std::chrono::duration;

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count();
}
double ms_between(steady_time from, steady_time to) { return duration<double, std::milli>(to - from).count(); }

// ─── Events ──────────────────────────────────────────────────────────────────────────

void emit(pb_run *run, pb_event &event) { plugin_emit(run->sink, &event); }

void emit_text(pb_run *run, pb_event_type type, const std::string &text) {
    if (text.empty()) return;
    pb_event event{};
    event.type = type;
    event.text = text.data();
    event.text_len = text.size();
    emit(run, event);
}

void emit_progress(pb_run *run, int64_t processed, int64_t total, int64_t cached) {
    pb_event event{};
    event.type = PB_EVENT_PROGRESS;
    event.progress_processed = processed;
    event.progress_total = total;
    event.progress_cached = cached;
    emit(run, event);
}

// The terminal event, and the run's waiter woken. Nothing is sent for the run afterwards.
void end_run(pb_run *run, pb_event &terminal) {
    emit(run, terminal);
    std::lock_guard<std::mutex> lock(run->done_mutex);
    run->done = true;
    run->done_cv.notify_all();
}

void end_with_finish(pb_run *run, pb_finish_reason reason, const std::string &text = "") {
    pb_event event{};
    event.type = PB_EVENT_FINISH;
    event.finish_reason = reason;
    event.text = text.empty() ? nullptr : text.data();
    event.text_len = text.size();
    end_run(run, event);
}

void end_with_error(pb_run *run, pb_status code, const std::string &message) {
    pb_event event{};
    event.type = PB_EVENT_ERROR;
    event.error_code = code;
    event.text = message.data();
    event.text_len = message.size();
    end_run(run, event);
}

// Whether the run's client is so far behind that the run should sit out this step.
bool client_behind(pb_run *run) {
    const pb_event_sink *sink = run->sink;
    if (!PB_HAS(sink, backlog_limit) || !sink->backlog || sink->backlog_limit == 0) return false;
    return sink->backlog(sink->context) >= sink->backlog_limit;
}

// ─── Slots ───────────────────────────────────────────────────────────────────────────

// How long after its cancel call the engine last computed for the run (0 when the cancel
// came between two computations), logged so the benchmark and the tests can read it.
void log_cancel(pb_run *run, const slot *s, int64_t last_compute_ns, const char *phase) {
    int64_t cancel_ns = run->cancel_ns.load();
    double latency = cancel_ns > 0 ? std::max<int64_t>(0, last_compute_ns - cancel_ns) / 1e6 : 0;
    const std::string &id = run->request.request_id;
    const char *named = id.empty() ? "" : " request ";
    if (s && s->state == slot::prefill)
        plugin_log(plugin_host, PB_LOG_INFO, "run cancelled: engine stopped %.2f ms after the cancel call (%s, %zu/%zu prompt tokens)%s%s",
                   latency, phase, s->n_prompt_done, run->request.prompt.size(), named, id.c_str());
    else
        plugin_log(plugin_host, PB_LOG_INFO, "run cancelled: engine stopped %.2f ms after the cancel call (%s, %d tokens generated)%s%s",
                   latency, phase, s ? s->n_generated : 0, named, id.c_str());
}

void send_usage_and_timings(pb_run *run, const slot &s) {
    pb_event usage{};
    usage.type = PB_EVENT_USAGE;
    usage.prompt_tokens = (int64_t)run->request.prompt.size();
    usage.completion_tokens = s.n_generated;
    usage.cached_tokens = (int64_t)s.n_cached;
    emit(run, usage);
    if (s.state != slot::generating) return;
    auto now = clock_type::now();
    pb_event timings{};
    timings.type = PB_EVENT_TIMINGS;
    timings.prompt_ms = ms_between(s.t_start, s.t_prompt_done);
    timings.predicted_ms = ms_between(s.t_prompt_done, now);
    size_t prompt_done = run->request.prompt.size() - s.n_cached;
    timings.prompt_per_second = timings.prompt_ms > 0 ? prompt_done * 1000.0 / timings.prompt_ms : 0;
    timings.predicted_per_second = timings.predicted_ms > 0 ? s.n_generated * 1000.0 / timings.predicted_ms : 0;
    emit(run, timings);
}

// Delivers newly generated text: raw for a completion; for a chat, through llama-server's
// incremental parser (task_result_state), which splits content, reasoning and tool calls.
void deliver(slot &s, const std::string &text, bool final) {
    pb_run *run = s.run;
    if (!s.chat_state) {
        emit_text(run, PB_EVENT_CONTENT_DELTA, text);
        return;
    }
    if (text.empty() && !final) return;
    std::vector<common_chat_msg_diff> diffs;
    try {
        s.chat_state->update_chat_msg(text, /*is_partial=*/!final, diffs, /*filter_tool_calls=*/true);
    } catch (const std::exception &e) {
        // A partial message the parser cannot read yet; it is parsed again with more text.
        if (!final) return;
        plugin_log(plugin_host, PB_LOG_WARNING, "the chat parser could not read the answer (%s); sent as plain text", e.what());
        emit_text(run, PB_EVENT_CONTENT_DELTA, s.chat_state->generated_text);
        return;
    }
    for (const auto &diff : diffs) {
        emit_text(run, PB_EVENT_REASONING_DELTA, diff.reasoning_content_delta);
        emit_text(run, PB_EVENT_CONTENT_DELTA, diff.content_delta);
        if (diff.tool_call_index == std::string::npos) continue;
        pb_event event{};
        event.type = PB_EVENT_TOOL_CALL_DELTA;
        event.tool_index = (int32_t)diff.tool_call_index;
        event.tool_call_id = diff.tool_call_delta.id.empty() ? nullptr : diff.tool_call_delta.id.c_str();
        event.tool_name = diff.tool_call_delta.name.empty() ? nullptr : diff.tool_call_delta.name.c_str();
        event.text = diff.tool_call_delta.arguments.data();
        event.text_len = diff.tool_call_delta.arguments.size();
        emit(run, event);
    }
}

void release(slot &s) {
    s.run = nullptr;
    s.state = slot::idle;
    s.sampler = nullptr;
    s.chat_state.reset();
    s.generated.clear();
    s.stop_word.clear();
}

// The run in `s` ends normally: the text held back for a possible stop string goes out,
// then usage, timings and the finish.
void finish_slot(slot &s) {
    pb_run *run = s.run;
    size_t valid = validate_utf8(s.generated);
    deliver(s, s.generated.substr(std::min(s.n_sent, valid), valid - std::min(s.n_sent, valid)), /*final=*/true);
    send_usage_and_timings(run, s);
    pb_finish_reason reason = PB_FINISH_STOP;
    if (s.stop_kind == 3) reason = PB_FINISH_LENGTH;
    else if (s.chat_state && !s.chat_state->chat_msg.tool_calls.empty()) reason = PB_FINISH_TOOL_CALLS;
    else if (s.stop_kind == 2) reason = PB_FINISH_STOP_SEQUENCE;
    std::string word = reason == PB_FINISH_STOP_SEQUENCE ? s.stop_word : "";
    release(s);
    end_with_finish(run, reason, word);
}

// The run in `s` ends early (cancel, time limit, error): what it produced went out already.
void abandon_slot(slot &s, pb_finish_reason reason) {
    pb_run *run = s.run;
    send_usage_and_timings(run, s);
    release(s);
    end_with_finish(run, reason);
}

void fail_slot(slot &s, pb_status code, const std::string &message) {
    pb_run *run = s.run;
    release(s);
    end_with_error(run, code, message);
}

// A stop string in the text (llama-server's find_stopping_strings): with `full`, one that
// ends within the last token's reach; otherwise the start of a partial one at the end.
size_t find_stop(const slot &s, const std::string &text, size_t last_token_size, bool full, std::string *word) {
    size_t found = std::string::npos;
    for (const std::string &stop : s.run->request.params.antiprompt) {
        size_t pos;
        if (full) {
            size_t reach = stop.size() + last_token_size;
            pos = text.find(stop, text.size() > reach ? text.size() - reach : 0);
        } else {
            pos = string_find_partial_stop(text, stop);
        }
        if (pos != std::string::npos && (found == std::string::npos || pos < found)) {
            found = pos;
            if (word) *word = stop;
        }
    }
    return found;
}

// One sampled token: its text checked for stop strings and delivered, and the limits
// checked (llama-server's process_token). Returns whether the run goes on.
bool take_token(pb_model *model, slot &s, llama_token token) {
    const task_params &params = s.run->request.params;
    bool special = params.sampling.preserved_tokens.count(token) > 0;
    std::string piece = common_token_to_piece(model->ctx, token, special);
    s.n_generated++;
    s.generated += piece;
    bool eog = llama_vocab_is_eog(model->vocab, token);
    bool go_on = !eog;
    if (eog) s.stop_kind = 1;
    if (validate_utf8(s.generated) == s.generated.size()) {  // never split a character
        size_t from = std::min(s.n_sent, s.generated.size());
        std::string tail = s.generated.substr(from);
        std::string word;
        size_t stop = find_stop(s, tail, piece.size(), true, &word);
        bool send = true;
        if (stop != std::string::npos) {
            s.generated.erase(from + stop);
            s.stop_kind = 2;
            s.stop_word = word;
            go_on = false;
        } else if (go_on) {
            send = find_stop(s, tail, piece.size(), false, nullptr) == std::string::npos;
        }
        if (send) {
            std::string text = s.generated.substr(from);
            s.n_sent += text.size();
            deliver(s, text, false);
        }
    }
    if (go_on && (int64_t)s.cache.size() + 2 >= model->context_length) {  // the context is full
        s.stop_kind = 3;
        go_on = false;
    }
    if (go_on && params.n_predict >= 0 && s.n_generated >= params.n_predict) {
        s.stop_kind = 3;
        go_on = false;
    }
    s.next_token = token;
    return go_on;
}

// ─── The loop's three parts ──────────────────────────────────────────────────────────

// Picks the free slot whose cache shares the longest prefix with the prompt (then the
// least recently used), drops the rest of its cache, and starts the run's prefill.
void admit(pb_model *model, pb_run *run) {
    const auto &prompt = run->request.prompt;
    slot *best = nullptr;
    size_t best_prefix = 0;
    for (slot &s : model->slots) {
        if (s.run) continue;
        size_t prefix = common_prefix(s.cache, prompt);
        if (!best || prefix > best_prefix || (prefix == best_prefix && s.last_used < best->last_used)) {
            best = &s;
            best_prefix = prefix;
        }
    }
    slot &s = *best;
    // At least the last prompt token is computed again: its logits give the first token.
    size_t keep = std::min(best_prefix, prompt.size() - 1);
    llama_memory_t memory = llama_get_memory(model->ctx);
    if (!llama_memory_seq_rm(memory, s.id, (llama_pos)keep, -1)) {
        llama_memory_seq_rm(memory, s.id, -1, -1);
        keep = 0;
    }
    s.cache.resize(keep);
    s.run = run;
    s.state = slot::prefill;
    s.n_prompt_done = keep;
    s.n_cached = keep;
    s.n_generated = 0;
    s.n_sent = 0;
    s.stop_kind = 0;
    s.generated.clear();
    s.sampler = run->request.sampler;
    if (run->request.is_chat) s.chat_state = std::make_unique<task_result_state>(run->request.params.chat_parser_params);
    s.t_start = s.t_last_progress = clock_type::now();
    s.last_used = ++model->step;
}

// llama_decode, and when the shared KV cache (kv_unified) is full, again after dropping the
// caches that idle slots keep for prefix reuse. Returns llama_decode's status.
int decode(pb_model *model, llama_batch &batch) {
    int status = llama_decode(model->ctx, batch);
    if (model->abort_noted.exchange(false)) g_deliberate_aborts--;
    if (status != 1 || !model->settings.kv_unified) return status;
    bool freed = false;
    for (slot &s : model->slots) {
        if (s.run || s.cache.empty()) continue;
        llama_memory_seq_rm(llama_get_memory(model->ctx), s.id, -1, -1);
        s.cache.clear();
        freed = true;
    }
    if (!freed) return status;
    status = llama_decode(model->ctx, batch);
    if (model->abort_noted.exchange(false)) g_deliberate_aborts--;
    return status;
}

// Tokens of the KV cache that a failed or aborted decode left for a sequence.
void resync_cache(pb_model *model, slot &s) {
    llama_pos last = llama_memory_seq_pos_max(llama_get_memory(model->ctx), s.id);
    s.cache.resize(std::min(s.cache.size(), (size_t)(last + 1)));
}

// One token for every generating slot whose client keeps up, decoded together.
void decode_step(pb_model *model, llama_batch &batch) {
    batch.n_tokens = 0;
    std::vector<slot *> members;
    for (slot &s : model->slots) {
        if (s.state != slot::generating || s.run->cancelled.load() || client_behind(s.run)) continue;
        int i = batch.n_tokens++;
        batch.token[i] = s.next_token;
        batch.pos[i] = (llama_pos)s.cache.size();
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = s.id;
        batch.logits[i] = 1;
        members.push_back(&s);
    }
    if (members.empty()) return;
    int status = decode(model, batch);
    int64_t computed = now_ns();
    for (size_t k = 0; k < members.size(); k++) {
        slot &s = *members[k];
        s.last_compute_ns = computed;
        if (status != 0) {
            resync_cache(model, s);
            if (status == 1) {  // the context is full (a shared one, even without idle slots' caches)
                s.stop_kind = 3;
                finish_slot(s);
            } else {
                fail_slot(s, PB_ERR_INTERNAL, "llama_decode failed (" + std::to_string(status) + ").");
            }
            continue;
        }
        s.cache.push_back(s.next_token);
        llama_token token = common_sampler_sample(s.sampler, model->ctx, (int)k);
        common_sampler_accept(s.sampler, token, true);
        if (!take_token(model, s, token)) finish_slot(s);
    }
}

// One chunk of the oldest unfinished prompt, in a batch of its own (see the top).
void prefill_step(pb_model *model, llama_batch &batch) {
    slot *next = nullptr;
    for (slot &s : model->slots)
        if (s.state == slot::prefill && !s.run->cancelled.load() && (!next || s.last_used < next->last_used)) next = &s;
    if (!next) return;
    slot &s = *next;
    pb_run *run = s.run;
    const auto &prompt = run->request.prompt;
    size_t end = std::min(prompt.size(), s.n_prompt_done + (size_t)model->settings.batch);
    batch.n_tokens = 0;
    for (size_t p = s.n_prompt_done; p < end; p++) {
        int i = batch.n_tokens++;
        batch.token[i] = prompt[p];
        batch.pos[i] = (llama_pos)p;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = s.id;
        batch.logits[i] = p + 1 == prompt.size();
    }
    model->prefilling.store(run);
    int status = decode(model, batch);
    model->prefilling.store(nullptr);
    s.last_compute_ns = now_ns();
    if (status != 0) {
        resync_cache(model, s);  // what the finished micro-batches left stays reusable
        s.n_prompt_done = s.cache.size();
        if (status == 2 || run->cancelled.load()) {
            log_cancel(run, &s, s.last_compute_ns, "during prompt processing");
            abandon_slot(s, PB_FINISH_CANCELLED);
        } else if (status == 1) {
            fail_slot(s, PB_ERR_CONTEXT_LENGTH_EXCEEDED,
                      model->settings.kv_unified
                          ? "The context (shared by all slots) has no room for this prompt beside the other runs; "
                            "try again when they finish, or load with a larger max_seq_length."
                          : "The slot's context has no room for this prompt; load with a larger max_seq_length.");
        } else {
            fail_slot(s, PB_ERR_INTERNAL, "llama_decode failed (" + std::to_string(status) + ").");
        }
        return;
    }
    s.cache.insert(s.cache.end(), prompt.begin() + s.n_prompt_done, prompt.begin() + end);
    s.n_prompt_done = end;
    s.t_last_progress = clock_type::now();
    emit_progress(run, (int64_t)end, (int64_t)prompt.size(), (int64_t)s.n_cached);
    if (end < prompt.size()) return;

    // The prompt is in: as llama-server, the sampler sees the prompt (for penalties), then
    // gives the first token.
    s.t_prompt_done = clock_type::now();
    s.state = slot::generating;
    common_sampler_reset(s.sampler);
    for (llama_token token : prompt) common_sampler_accept(s.sampler, token, false);
    llama_token token = common_sampler_sample(s.sampler, model->ctx, batch.n_tokens - 1);
    common_sampler_accept(s.sampler, token, true);
    if (!take_token(model, s, token)) finish_slot(s);
}

// Ends runs that were cancelled or are past their deadline; keeps waiting runs informed.
void sweep(pb_model *model, std::deque<pb_run *> &waiting) {
    auto now = clock_type::now();
    for (slot &s : model->slots) {
        if (!s.run) continue;
        if (s.run->cancelled.load()) {
            log_cancel(s.run, &s, s.last_compute_ns, s.state == slot::prefill ? "before its next prompt chunk" : "during decoding");
            abandon_slot(s, PB_FINISH_CANCELLED);
        } else if (s.run->has_deadline && now >= s.run->deadline) {
            abandon_slot(s, PB_FINISH_TIME_LIMIT);
        } else if (s.state == slot::prefill && now - s.t_last_progress >= std::chrono::seconds(1)) {
            emit_progress(s.run, (int64_t)s.n_prompt_done, (int64_t)s.run->request.prompt.size(), (int64_t)s.n_cached);
            s.t_last_progress = now;
        }
    }
    for (auto it = waiting.begin(); it != waiting.end();) {
        pb_run *run = *it;
        if (run->cancelled.load() || (run->has_deadline && now >= run->deadline)) {
            it = waiting.erase(it);
            if (run->cancelled.load()) log_cancel(run, nullptr, 0, "while waiting for a slot");
            end_with_finish(run, run->cancelled.load() ? PB_FINISH_CANCELLED : PB_FINISH_TIME_LIMIT);
            continue;
        }
        if (now - run->waiting_since >= std::chrono::seconds(1)) {  // PB_EVENT_PROGRESS at least every second
            emit_progress(run, 0, (int64_t)run->request.prompt.size(), 0);
            run->waiting_since = now;
        }
        ++it;
    }
}

void engine_main(pb_model *model) {
    int capacity = std::max(model->settings.batch, (int)model->slots.size());
    llama_batch batch = llama_batch_init(capacity, 0, 1);
    std::deque<pb_run *> waiting;  // runs taken from the model's queue, in arrival order
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(model->mutex);
            for (;;) {
                while (!model->waiting.empty()) {
                    waiting.push_back(model->waiting.front());
                    model->waiting.pop_front();
                }
                if (model->stopping) break;
                bool busy = !waiting.empty();
                for (slot &s : model->slots) busy = busy || s.run;
                if (busy) break;
                model->wake.wait(lock);
            }
            if (model->stopping) break;
        }
        sweep(model, waiting);
        for (slot &s : model->slots) {
            if (waiting.empty()) break;
            if (s.run) continue;
            admit(model, waiting.front());
            waiting.pop_front();
        }
        decode_step(model, batch);
        prefill_step(model, batch);

        // Every active run is paused behind a slow client (or none is active): wait a
        // little instead of spinning; a cancel or a new run wakes the loop at once.
        bool progressing = false;
        for (slot &s : model->slots)
            progressing = progressing || (s.state == slot::prefill) ||
                          (s.state == slot::generating && !client_behind(s.run));
        if (!progressing) {
            std::unique_lock<std::mutex> lock(model->mutex);
            if (model->waiting.empty() && !model->stopping) model->wake.wait_for(lock, std::chrono::milliseconds(5));
        }
    }
    // Unload comes only after every run was destroyed, so nothing is left to end here;
    // a run still in a slot would be a host bug, and is ended rather than left hanging.
    for (slot &s : model->slots)
        if (s.run) abandon_slot(s, PB_FINISH_CANCELLED);
    for (pb_run *run : waiting) end_with_finish(run, PB_FINISH_CANCELLED);
    llama_batch_free(batch);
}

// llama.cpp's abort callback, asked between graph nodes: stop the prompt chunk now
// computing if its run was cancelled (it holds no other run's tokens), or at unload.
bool abort_requested(void *data) {
    auto *model = static_cast<pb_model *>(data);
    pb_run *run = model->prefilling.load();
    bool abort = model->aborting.load() || (run && run->cancelled.load());
    if (abort && !model->abort_noted.exchange(true)) g_deliberate_aborts++;
    return abort;
}

}  // namespace

void engine_start(pb_model *model) {
    model->slots.resize(model->settings.parallel);
    for (int i = 0; i < model->settings.parallel; i++) model->slots[i].id = i;
    llama_set_abort_callback(model->ctx, abort_requested, model);
    model->engine_thread = std::thread(engine_main, model);
}

void engine_stop(pb_model *model) {
    {
        std::lock_guard<std::mutex> lock(model->mutex);
        model->stopping = true;
        model->aborting.store(true);
    }
    model->wake.notify_all();
    if (model->engine_thread.joinable()) model->engine_thread.join();
}

void engine_submit(pb_model *model, pb_run *run) {
    run->waiting_since = clock_type::now();
    {
        std::lock_guard<std::mutex> lock(model->mutex);
        model->waiting.push_back(run);
    }
    model->wake.notify_all();
}

void engine_wake(pb_model *model) {
    { std::lock_guard<std::mutex> lock(model->mutex); }
    model->wake.notify_all();
}
