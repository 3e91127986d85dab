#include "errors.h"
#include "json_reader.h"
#include "plugin_util.h"

#include <string.h>

pb_status map_upstream_error(long http_status, const char *body, uint32_t header_retry_after_ms,
                             char *message, size_t size, uint32_t *retry_after_ms) {
    json_value *parsed = json_parse(body ? body : "");
    const json_value *error = json_get(parsed, "error");
    const char *text = json_get_string(error, "message");
    const char *type = json_get_string(error, "type");
    if (!text) text = json_get_string(parsed, "message");
    plugin_set_error(message, size, "%s", text ? text : (body && *body ? body : "llama-server returned an error"));
    pb_status status;
    if ((type && strcmp(type, "exceed_context_size_error") == 0) || (text && strstr(text, "exceeds the available context size")))
        status = PB_ERR_CONTEXT_LENGTH_EXCEEDED;
    else if (http_status == 429) status = PB_ERR_BUSY;
    /* llama-server answers 503 while its model loads ("Loading model") or when it is unavailable:
     * not ready yet, as opposed to gone (a lost child is PB_ERR_ENGINE_UNAVAILABLE). */
    else if (http_status == 503) status = PB_ERR_OVERLOADED;
    else if (http_status == 404) status = PB_ERR_NOT_FOUND;
    else if (http_status == 501) status = PB_ERR_UNSUPPORTED;
    else if (http_status >= 400 && http_status < 500) status = PB_ERR_INVALID_REQUEST;
    else status = PB_ERR_INTERNAL;
    json_free(parsed);
    *retry_after_ms = 0;
    if (status == PB_ERR_BUSY || status == PB_ERR_OVERLOADED)
        *retry_after_ms = header_retry_after_ms ? header_retry_after_ms : DEFAULT_RETRY_AFTER_MS;
    return status;
}
