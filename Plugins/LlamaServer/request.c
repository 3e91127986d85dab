#include "request.h"
#include "json_buffer.h"
#include "plugin_util.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ─── Byte inputs ───────────────────────────────────────────────────────── */

void request_base64(const unsigned char *bytes, size_t size, char *out) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0;
    for (; i + 3 <= size; i += 3) {
        uint32_t v = (uint32_t)bytes[i] << 16 | (uint32_t)bytes[i + 1] << 8 | bytes[i + 2];
        *out++ = alphabet[v >> 18 & 63];
        *out++ = alphabet[v >> 12 & 63];
        *out++ = alphabet[v >> 6 & 63];
        *out++ = alphabet[v & 63];
    }
    if (i < size) {
        uint32_t v = (uint32_t)bytes[i] << 16 | (i + 1 < size ? (uint32_t)bytes[i + 1] << 8 : 0);
        *out++ = alphabet[v >> 18 & 63];
        *out++ = alphabet[v >> 12 & 63];
        *out++ = i + 1 < size ? alphabet[v >> 6 & 63] : '=';
        *out++ = '=';
    }
}

/* The byte input called `name`, or NULL. Reads each input only within its struct_size (PB_HAS). */
static const pb_byte_input *find_input(const pb_byte_input *const *inputs, size_t count, const char *name) {
    for (size_t i = 0; name && i < count; i++) {
        const pb_byte_input *input = inputs[i];
        if (!input || !PB_HAS(input, size) || !input->name) continue;
        if (strcmp(input->name, name) == 0) return input;
    }
    return NULL;
}

static int is_token_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("!#$&^_.+-/", c);
}

/*
 * The media type for the data: URL. llama-server accepts only data:image/…
 * URLs and decodes the image by its content, so an empty or non-image type
 * (or one that would need escaping) is replaced by one read from the magic
 * bytes, or image/png.
 */
static const char *image_media_type(const pb_byte_input *input) {
    const char *given = input->media_type;
    if (given && strncmp(given, "image/", 6) == 0 && given[6]) {
        const char *c = given;
        while (*c && is_token_char(*c)) c++;
        if (!*c) return given;
    }
    const unsigned char *d = input->data;
    size_t n = input->size;
    if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return "image/jpeg";
    if (n >= 6 && memcmp(d, "GIF8", 4) == 0) return "image/gif";
    if (n >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0) return "image/webp";
    if (n >= 2 && memcmp(d, "BM", 2) == 0) return "image/bmp";
    return "image/png";
}

/* {"type":"image_url","image_url":{"url":"data:MEDIA;base64,…"}} for one byte input. */
static void append_image_url_part(json_buffer *b, const pb_byte_input *input) {
    jb_append_str(b, "{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:");
    jb_append_str(b, image_media_type(input));
    jb_append_str(b, ";base64,");
    /* In slices, so that a large image needs no second full-size buffer beside the body. */
    char encoded[4 * 1024];
    const size_t slice = sizeof encoded / 4 * 3;
    for (size_t offset = 0; offset < input->size; offset += slice) {
        size_t n = input->size - offset < slice ? input->size - offset : slice;
        request_base64(input->data + offset, n, encoded);
        jb_append(b, encoded, 4 * ((n + 2) / 3));
    }
    jb_append_str(b, "\"}}");
}

/*
 * The messages as given, except that an image part naming a byte input,
 * {"type":"image","image":{"input":NAME}}, becomes the image_url part
 * llama-server reads. The ABI hands images over as raw bytes; llama-server
 * takes them only inside the JSON, as base64. Returns PB_OK, or
 * PB_ERR_INVALID_REQUEST for a name that is not among the inputs.
 */
static pb_status append_messages(json_buffer *b, const json_value *messages, const pb_byte_input *const *inputs,
                                 size_t input_count, char *error, size_t error_size) {
    if (!messages || messages->kind != JSON_ARRAY) {
        jb_append_json_value(b, messages);
        return PB_OK;
    }
    jb_append_str(b, "[");
    for (size_t m = 0; m < messages->count; m++) {
        const json_value *message = &messages->items[m];
        if (m) jb_append_str(b, ",");
        const json_value *content = json_get(message, "content");
        if (message->kind != JSON_OBJECT || !content || content->kind != JSON_ARRAY) {
            jb_append_json_value(b, message);
            continue;
        }
        jb_append_str(b, "{");
        for (size_t k = 0; k < message->count; k++) {
            jb_key(b, message->keys[k]);
            if (&message->items[k] != content) {
                jb_append_json_value(b, &message->items[k]);
                continue;
            }
            jb_append_str(b, "[");
            for (size_t p = 0; p < content->count; p++) {
                const json_value *part = &content->items[p];
                if (p) jb_append_str(b, ",");
                const char *type = json_get_string(part, "type");
                if (!type || strcmp(type, "image") != 0) {
                    jb_append_json_value(b, part);
                    continue;
                }
                const char *name = json_get_string(json_get(part, "image"), "input");
                const pb_byte_input *input = find_input(inputs, input_count, name);
                if (!input) {
                    plugin_set_error(error, error_size, "The image part names the byte input '%s', which the request does not have.",
                                     name ? name : "(none)");
                    return PB_ERR_INVALID_REQUEST;
                }
                append_image_url_part(b, input);
            }
            jb_append_str(b, "]");
        }
        jb_append_str(b, "}");
    }
    jb_append_str(b, "]");
    return PB_OK;
}

/* ─── The body ──────────────────────────────────────────────────────────── */

static int64_t clamp(int64_t value, int64_t min, int64_t max) { return value < min ? min : value > max ? max : value; }

int64_t request_max_tokens(const json_value *request) {
    return clamp(json_get_int64(request, "max_tokens", -1), -1, INT32_MAX);
}

static void forward(json_buffer *b, const json_value *request, const char *const *keys) {
    for (const char *const *key = keys; *key; key++) {
        const json_value *value = json_get(request, *key);
        if (!value || value->kind == JSON_NULL) continue;
        jb_key(b, *key);
        jb_append_json_value(b, value);
    }
}

char *request_build_body(const json_value *request, int is_completion, const pb_byte_input *const *inputs,
                         size_t input_count, pb_status *status, char *error, size_t error_size) {
    static const char *const forwarded[] = {
        "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed", "stop",
        "response_format", NULL,
    };
    static const char *const chat_only[] = {
        "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", NULL,
    };
    json_buffer b;
    jb_init(&b);
    jb_append_str(&b, "{");
    *status = PB_OK;
    if (is_completion) {
        jb_key(&b, "prompt");
        jb_append_json_value(&b, json_get(request, "prompt"));
    } else {
        jb_key(&b, "messages");
        *status = append_messages(&b, json_get(request, "messages"), inputs, input_count, error, error_size);
        if (*status != PB_OK) {
            jb_free(&b);
            return NULL;
        }
    }
    jb_key(&b, "stream");
    jb_append_str(&b, "true");
    jb_key(&b, "stream_options");
    jb_append_str(&b, "{\"include_usage\":true}");
    /* Progress chunks after every prompt batch wake llama-server's HTTP thread, which is
     * when it notices a closed connection; without them a close during prefill goes
     * unnoticed until the prompt is done (its 1 s poll restarts on every other result).
     * They also become PB_EVENT_PROGRESS (sse.c). */
    jb_key(&b, "return_progress");
    jb_append_str(&b, "true");
    /* Why the generation ended. The OpenAI-shaped stream says only "stop" or "length"
     * for a stop string, EOS, max_tokens, a full context and t_max_predict_ms alike, and
     * llama-server cuts the matched stop string out of the text, so the plugin cannot
     * tell from the text which string matched (nor whether one did, or EOS came).
     * llama-server knows (stop_type, stopping_word) and puts its own fields beside the
     * OpenAI ones in the first chunk of the last result as `__verbose` when `verbose` is
     * set; `response_fields` cuts that part down to these few fields (it would otherwise
     * repeat the whole prompt and the generation settings). See server-task.cpp,
     * server_task_result_cmpl_final::to_json_oaicompat_chat_stream. */
    jb_key(&b, "verbose");
    jb_append_str(&b, "true");
    jb_key(&b, "response_fields");
    jb_append_str(&b, "[\"stop_type\",\"stopping_word\",\"truncated\",\"tokens_predicted\"]");
    jb_key(&b, "max_tokens");
    jb_printf(&b, "%lld", (long long)request_max_tokens(request));
    forward(&b, request, forwarded);
    if (!is_completion) forward(&b, request, chat_only);
    const json_value *top_k = json_get(request, "top_k");
    if (top_k && top_k->kind == JSON_NUMBER) {
        jb_key(&b, "top_k"); /* OpenAI-style -1 ("off") is llama.cpp's 0 */
        jb_printf(&b, "%lld", (long long)clamp(json_get_int64(request, "top_k", 0), 0, INT32_MAX));
    }
    const json_value *repetition = json_get(request, "repetition_penalty");
    if (repetition && repetition->kind == JSON_NUMBER) {
        jb_key(&b, "repeat_penalty");
        jb_append_json_value(&b, repetition);
    }
    /* llama-server's own limit counts from the first token and ends a generation only at a
     * newline; the run's deadline (llama_server_plugin.c) is the one that holds. */
    int64_t wall_ms = json_get_int64(request, "max_wall_ms", 0);
    if (wall_ms > 0) {
        jb_key(&b, "t_max_predict_ms");
        jb_printf(&b, "%lld", (long long)wall_ms);
    }
    jb_append_str(&b, "}");
    if (b.failed) {
        jb_free(&b);
        *status = PB_ERR_OUT_OF_MEMORY;
        plugin_set_error(error, error_size, "Out of memory.");
        return NULL;
    }
    return b.data;
}
