// prompt.cpp — a normalized request into prompt tokens and generation settings.
//
// Parity with the llama-server backend is the point: the request goes through the same
// functions llama-server runs for /v1/chat/completions and /v1/completions
// (oaicompat_chat_params_parse renders the chat template with tools and reasoning
// kwargs; eval_llama_cmpl_schema reads sampling, stop strings, grammar and JSON schema
// into task_params), so the same model and template give the same prompt tokens, the
// same sampler and the same tool-call parser in both backends.
#include "libllama.h"

#include "server-schema.h"

#include <climits>

namespace {

// The normalized fields llama-server reads under the same names (the llama-server
// plugin forwards the same list, request.c).
const char *const forwarded[] = {
    "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed", "stop", "response_format",
};
const char *const chat_only[] = {"tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"};

bool present(const json &object, const char *key) { return object.contains(key) && !object.at(key).is_null(); }

int64_t integer(const json &object, const char *key, int64_t fallback) {
    if (!present(object, key) || !object.at(key).is_number()) return fallback;
    double value = object.at(key).get<double>();
    if (value >= 9.2e18) return INT64_MAX;
    if (value <= -9.2e18) return INT64_MIN;
    return (int64_t)value;
}

// The body llama-server would have received from the llama-server plugin.
json llama_server_body(const json &request, bool is_chat) {
    json body = json::object();
    if (is_chat) {
        body["messages"] = request.contains("messages") ? request.at("messages") : json();
        for (const char *key : chat_only)
            if (present(request, key)) body[key] = request.at(key);
    } else {
        body["prompt"] = request.contains("prompt") ? request.at("prompt") : json();
    }
    for (const char *key : forwarded)
        if (present(request, key)) body[key] = request.at(key);
    body["max_tokens"] = std::max<int64_t>(-1, std::min<int64_t>(integer(request, "max_tokens", -1), INT32_MAX));
    if (present(request, "top_k") && request.at("top_k").is_number())  // OpenAI-style -1 ("off") is llama.cpp's 0
        body["top_k"] = std::max<int64_t>(0, std::min<int64_t>(integer(request, "top_k", 0), INT32_MAX));
    if (present(request, "repetition_penalty")) body["repeat_penalty"] = request.at("repetition_penalty");
    return body;
}

}  // namespace

size_t common_prefix(const std::vector<llama_token> &a, const std::vector<llama_token> &b) {
    size_t n = 0;
    while (n < a.size() && n < b.size() && a[n] == b[n]) n++;
    return n;
}

pb_status prepare_request(pb_model *model, const std::string &request_json, bool for_counting,
                          prepared_request &out, std::string &error) {
    json request = json::parse_no_throw(request_json);
    if (!request.is_object()) {
        error = "The request is not a JSON object.";
        return PB_ERR_INVALID_REQUEST;
    }
    std::string kind = request.contains("kind") && request.at("kind").is_string() ? request.at("kind").get<std::string>()
                                                                                 : "chat";
    if (kind != "chat" && kind != "completion") {
        error = "The libllama backend serves chat and completion requests, not '" + kind + "'.";
        return PB_ERR_UNSUPPORTED;
    }
    out.is_chat = kind == "chat";
    try {
        json body = llama_server_body(request, out.is_chat);
        json data;
        if (out.is_chat) {
            std::vector<raw_buffer> files;
            data = oaicompat_chat_params_parse(body, model->chat, files);
            if (!files.empty()) {
                error = "This model takes text only (the libllama backend has no vision projector); send images to "
                        "the llama-server backend.";
                return PB_ERR_UNSUPPORTED;
            }
        } else {
            data = oaicompat_completion_params_parse(body);
        }
        const json &prompt = data.at("prompt");
        if (!prompt.is_string()) {
            error = "'prompt' must be a string.";
            return PB_ERR_INVALID_REQUEST;
        }
        out.prompt = common_tokenize(model->vocab, prompt.get<std::string>(), /*add_special=*/true,
                                     /*parse_special=*/true);
        if (for_counting) return PB_OK;
        if (out.prompt.empty()) {
            error = "The prompt is empty.";
            return PB_ERR_INVALID_REQUEST;
        }
        if ((int64_t)out.prompt.size() >= model->context_length) {
            error = "The prompt is " + std::to_string(out.prompt.size()) + " tokens, more than the model's context of " +
                    std::to_string(model->context_length) + " tokens leaves room for.";
            return PB_ERR_CONTEXT_LENGTH_EXCEEDED;
        }
        out.params = server_schema::eval_llama_cmpl_schema(model->vocab, model->params_base, model->logit_bias_eog, data);
    } catch (const std::exception &e) {
        error = e.what();
        return PB_ERR_INVALID_REQUEST;
    }
    out.max_wall_ms = integer(request, "max_wall_ms", 0);
    if (request.contains("request_id") && request.at("request_id").is_string())
        out.request_id = request.at("request_id").get<std::string>();
    return PB_OK;
}
