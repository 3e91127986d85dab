#include "sse.h"
#include "errors.h"
#include "json_reader.h"

#include <stdlib.h>
#include <string.h>

void sse_reader_init(sse_reader *reader, int is_completion, sse_emit_fn emit, void *context) {
    memset(reader, 0, sizeof *reader);
    reader->is_completion = is_completion;
    reader->emit = emit;
    reader->context = context;
    jb_init(&reader->pending);
}

void sse_reader_free(sse_reader *reader) {
    jb_free(&reader->pending);
    free(reader->stop_type);
    free(reader->stopping_word);
    reader->stop_type = reader->stopping_word = NULL;
}

static void emit_text(sse_reader *reader, pb_event_type type, const char *text) {
    if (!text || !*text) return;
    pb_event event = {.type = type, .text = text, .text_len = strlen(text)};
    reader->output_started = 1;
    reader->emit(reader->context, &event);
}

static void replace_string(char **slot, const char *value) {
    free(*slot);
    *slot = value ? strdup(value) : NULL;
}

static pb_finish_reason finish_from(const char *reason) {
    if (!reason) return 0;
    if (strcmp(reason, "length") == 0) return PB_FINISH_LENGTH;
    if (strcmp(reason, "tool_calls") == 0) return PB_FINISH_TOOL_CALLS;
    return PB_FINISH_STOP;
}

static void read_choice(sse_reader *reader, const json_value *choice) {
    if (reader->is_completion) {
        emit_text(reader, PB_EVENT_CONTENT_DELTA, json_get_string(choice, "text"));
    } else {
        const json_value *delta = json_get(choice, "delta");
        emit_text(reader, PB_EVENT_REASONING_DELTA, json_get_string(delta, "reasoning_content"));
        emit_text(reader, PB_EVENT_CONTENT_DELTA, json_get_string(delta, "content"));
        const json_value *calls = json_get(delta, "tool_calls");
        for (size_t i = 0; calls && calls->kind == JSON_ARRAY && i < calls->count; i++) {
            const json_value *call = &calls->items[i];
            const json_value *function = json_get(call, "function");
            const char *arguments = json_get_string(function, "arguments");
            pb_event event = {
                .type = PB_EVENT_TOOL_CALL_DELTA,
                .tool_index = (int32_t)json_get_int64(call, "index", (int64_t)i),
                .tool_call_id = json_get_string(call, "id"),
                .tool_name = json_get_string(function, "name"),
                .text = arguments ? arguments : "",
                .text_len = arguments ? strlen(arguments) : 0,
            };
            reader->output_started = 1;
            reader->emit(reader->context, &event);
        }
    }
    pb_finish_reason finish = finish_from(json_get_string(choice, "finish_reason"));
    if (finish) reader->finish = finish;
}

/*
 * {"total","cache","processed","time_ms"}: llama-server's prompt_progress
 * (server-task.cpp, result_prompt_progress), sent after each prompt batch when
 * the request has return_progress. `processed` counts the cached tokens too.
 */
static void read_progress(sse_reader *reader, const json_value *progress) {
    reader->has_progress = 1;
    reader->progress = (pb_event){
        .type = PB_EVENT_PROGRESS,
        .progress_processed = json_get_int64(progress, "processed", 0),
        .progress_total = json_get_int64(progress, "total", 0),
        .progress_cached = json_get_int64(progress, "cache", 0),
    };
    pb_event event = reader->progress;
    reader->emit(reader->context, &event);
}

/* The `__verbose` part of the last chunk, cut down by response_fields to what request.c asked for. */
static void read_verbose(sse_reader *reader, const json_value *verbose) {
    const char *stop_type = json_get_string(verbose, "stop_type");
    if (!stop_type) return; /* a partial chunk's (completions): not the end yet */
    replace_string(&reader->stop_type, stop_type);
    replace_string(&reader->stopping_word, json_get_string(verbose, "stopping_word"));
    reader->truncated = json_get_bool(verbose, "truncated", 0);
    reader->tokens_predicted = json_get_int64(verbose, "tokens_predicted", 0);
}

/* One `data:` payload of the stream. Returns non-zero to stop reading. */
static int read_chunk(sse_reader *reader, const char *payload) {
    json_value *chunk = json_parse(payload);
    if (!chunk) return 0; /* not JSON: ignore */
    const json_value *error = json_get(chunk, "error");
    if (error) {
        char message[1024];
        uint32_t retry_after_ms;
        pb_status status = map_upstream_error((long)json_get_int64(error, "code", 500), payload, 0, message,
                                              sizeof message, &retry_after_ms);
        pb_event event = {.type = PB_EVENT_ERROR, .error_code = status, .text = message, .text_len = strlen(message),
                          .retry_after_ms = retry_after_ms};
        reader->failed = 1;
        reader->emit(reader->context, &event);
        json_free(chunk);
        return 1;
    }
    const json_value *progress = json_get(chunk, "prompt_progress");
    if (progress && progress->kind == JSON_OBJECT) read_progress(reader, progress);
    const json_value *choices = json_get(chunk, "choices");
    if (choices && choices->kind == JSON_ARRAY && choices->count > 0) read_choice(reader, &choices->items[0]);
    const json_value *verbose = json_get(chunk, "__verbose");
    if (verbose && verbose->kind == JSON_OBJECT) read_verbose(reader, verbose);
    const json_value *usage = json_get(chunk, "usage");
    if (usage && usage->kind == JSON_OBJECT) {
        pb_event event = {
            .type = PB_EVENT_USAGE,
            .prompt_tokens = json_get_int64(usage, "prompt_tokens", 0),
            .completion_tokens = json_get_int64(usage, "completion_tokens", 0),
            .cached_tokens = json_get_int64(json_get(usage, "prompt_tokens_details"), "cached_tokens", 0),
        };
        reader->emit(reader->context, &event);
    }
    /* Every chunk may carry timings; the last one's are the totals, sent once the stream is over. */
    const json_value *timings = json_get(chunk, "timings");
    if (timings && timings->kind == JSON_OBJECT) {
        reader->has_timings = 1;
        reader->timings = (pb_event){
            .type = PB_EVENT_TIMINGS,
            .prompt_ms = json_get_number(timings, "prompt_ms", 0),
            .predicted_ms = json_get_number(timings, "predicted_ms", 0),
            .prompt_per_second = json_get_number(timings, "prompt_per_second", 0),
            .predicted_per_second = json_get_number(timings, "predicted_per_second", 0),
        };
    }
    json_free(chunk);
    return 0;
}

int sse_reader_feed(sse_reader *reader, const char *bytes, size_t length) {
    jb_append(&reader->pending, bytes, length);
    if (reader->pending.failed) return 1;
    char *line = reader->pending.data;
    char *newline;
    while ((newline = memchr(line, '\n', reader->pending.length - (size_t)(line - reader->pending.data)))) {
        *newline = 0;
        if (newline > line && newline[-1] == '\r') newline[-1] = 0;
        /* Comment lines (": ping") and blank lines carry nothing. */
        const char *payload = NULL;
        if (strncmp(line, "data:", 5) == 0) payload = line + 5;
        else if (strncmp(line, "error:", 6) == 0) payload = line + 6;
        if (payload) {
            while (*payload == ' ') payload++;
            if (strcmp(payload, "[DONE]") != 0 && read_chunk(reader, payload) != 0) return 1;
        }
        line = newline + 1;
    }
    size_t rest = reader->pending.length - (size_t)(line - reader->pending.data);
    memmove(reader->pending.data, line, rest);
    reader->pending.length = rest;
    reader->pending.data[rest] = 0;
    return 0;
}

pb_finish_reason sse_reader_finish(const sse_reader *reader, int64_t max_tokens, int time_limited,
                                   const char **stop_sequence) {
    *stop_sequence = NULL;
    pb_finish_reason finish = reader->finish ? reader->finish : PB_FINISH_STOP;
    if (finish == PB_FINISH_TOOL_CALLS || !reader->stop_type) return finish;
    if (strcmp(reader->stop_type, "word") == 0 && reader->stopping_word && *reader->stopping_word) {
        *stop_sequence = reader->stopping_word;
        return PB_FINISH_STOP_SEQUENCE;
    }
    /* "limit" is max_tokens, a full context (truncated), or t_max_predict_ms (server-context.cpp,
     * process_token): the time limit is the one that ends it before max_tokens with room left. */
    if (strcmp(reader->stop_type, "limit") == 0 && time_limited && !reader->truncated &&
        (max_tokens <= 0 || reader->tokens_predicted < max_tokens))
        return PB_FINISH_TIME_LIMIT;
    return finish;
}
