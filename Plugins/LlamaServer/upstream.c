#include "upstream.h"

#include <curl/curl.h>
#include <ctype.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

int upstream_global_init(void) { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK; }

void upstream_global_cleanup(void) { curl_global_cleanup(); }

/* ─── Retry-After ───────────────────────────────────────────────────────── */

/* Longer waits than this are not advice a client can use; clamp them. */
#define MAX_RETRY_AFTER_MS (3600u * 1000u)

/* A Retry-After value: delay-seconds, or an HTTP date (RFC 9110 §10.2.3). 0 when unreadable. */
static uint32_t parse_retry_after(const char *value) {
    while (*value == ' ' || *value == '\t') value++;
    double ms;
    if (isdigit((unsigned char)*value)) {
        ms = strtod(value, NULL) * 1000.0;
    } else {
        time_t when = curl_getdate(value, NULL);
        if (when < 0) return 0;
        ms = difftime(when, time(NULL)) * 1000.0;
    }
    if (ms <= 0) return 0;
    return ms > MAX_RETRY_AFTER_MS ? MAX_RETRY_AFTER_MS : (uint32_t)ms;
}

/* CURLOPT_HEADERFUNCTION: picks Retry-After out of the reply's headers (one header per call). */
static size_t read_header(char *bytes, size_t size, size_t count, void *user) {
    uint32_t *retry_after_ms = user;
    size_t length = size * count;
    static const char name[] = "retry-after:";
    if (length > 5 && strncmp(bytes, "HTTP/", 5) == 0) *retry_after_ms = 0; /* a new reply (after a redirect or 1xx) */
    if (length > sizeof name - 1 && length < 256 && strncasecmp(bytes, name, sizeof name - 1) == 0) {
        char value[256];
        memcpy(value, bytes + sizeof name - 1, length - (sizeof name - 1));
        size_t n = length - (sizeof name - 1);
        while (n > 0 && isspace((unsigned char)value[n - 1])) n--; /* the header's CRLF */
        value[n] = 0;
        *retry_after_ms = parse_retry_after(value);
    }
    return length;
}

static struct curl_slist *headers_for(const char *api_key, int has_body) {
    char auth[300];
    struct curl_slist *headers = NULL;
    if (api_key && *api_key) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", api_key);
        headers = curl_slist_append(headers, auth);
    }
    if (has_body) headers = curl_slist_append(headers, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Expect:"); /* no 100-continue round trip on large prompts */
    return headers;
}

/* Settings shared by every request to a child. */
static void configure(CURL *easy, const char *socket_path, const char *url, struct curl_slist *headers,
                      const char *body) {
    curl_easy_setopt(easy, CURLOPT_UNIX_SOCKET_PATH, socket_path);
    curl_easy_setopt(easy, CURLOPT_URL, url);
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_FORBID_REUSE, 1L);
    curl_easy_setopt(easy, CURLOPT_FRESH_CONNECT, 1L);
    curl_easy_setopt(easy, CURLOPT_PROXY, ""); /* the child is local: never through a proxy from the environment */
    curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    if (body) {
        curl_easy_setopt(easy, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
    }
}

static size_t collect(char *bytes, size_t size, size_t count, void *user) {
    jb_append((json_buffer *)user, bytes, size * count);
    return size * count;
}

long upstream_request(const char *socket_path, const char *url, const char *api_key, const char *body, long timeout_ms,
                      json_buffer *out, upstream_reply_info *info, char *error, size_t error_size) {
    upstream_reply_info ignored;
    if (!info) info = &ignored;
    *info = (upstream_reply_info){0};
    CURL *easy = curl_easy_init();
    if (!easy) {
        snprintf(error, error_size, "curl_easy_init failed");
        return 0;
    }
    struct curl_slist *headers = headers_for(api_key, body != NULL);
    configure(easy, socket_path, url, headers, body);
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, read_header);
    curl_easy_setopt(easy, CURLOPT_HEADERDATA, &info->retry_after_ms);
    jb_clear(out);
    long status = 0;
    CURLcode code = curl_easy_perform(easy);
    if (code == CURLE_OK) {
        curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    } else {
        info->timed_out = code == CURLE_OPERATION_TIMEDOUT;
        snprintf(error, error_size, "%s", curl_easy_strerror(code));
    }
    curl_slist_free_all(headers);
    curl_easy_cleanup(easy);
    return status;
}

/* ─── Streaming ─────────────────────────────────────────────────────────── */

struct upstream_stream {
    CURLM *multi; /* created up front so that a cancel can wake a poll at any moment */
    atomic_int cancelled;
    upstream_on_data on_data;
    void *context;
    CURL *easy;
    int aborted;
    uint32_t retry_after_ms;
};

upstream_stream *upstream_stream_create(void) {
    upstream_stream *stream = calloc(1, sizeof *stream);
    if (!stream) return NULL;
    stream->multi = curl_multi_init();
    if (!stream->multi) {
        free(stream);
        return NULL;
    }
    return stream;
}

void upstream_stream_cancel(upstream_stream *stream) {
    atomic_store(&stream->cancelled, 1);
    curl_multi_wakeup(stream->multi); /* documented as callable from any thread */
}

int upstream_stream_cancelled(const upstream_stream *stream) { return atomic_load(&stream->cancelled); }

void upstream_stream_destroy(upstream_stream *stream) {
    if (!stream) return;
    curl_multi_cleanup(stream->multi);
    free(stream);
}

static size_t deliver(char *bytes, size_t size, size_t count, void *user) {
    upstream_stream *stream = user;
    if (atomic_load(&stream->cancelled)) return 0; /* aborts the transfer */
    long status = 0;
    curl_easy_getinfo(stream->easy, CURLINFO_RESPONSE_CODE, &status);
    if (stream->on_data(stream->context, status, bytes, size * count) != 0) {
        stream->aborted = 1;
        return 0;
    }
    return size * count;
}

uint32_t upstream_stream_retry_after_ms(const upstream_stream *stream) { return stream->retry_after_ms; }

upstream_result upstream_stream_run(upstream_stream *stream, const char *socket_path, const char *url,
                                    const char *api_key, const char *body,
                                    upstream_on_data on_data, upstream_on_tick on_tick, void *context,
                                    long *http_status, char *error, size_t error_size) {
    *http_status = 0;
    if (atomic_load(&stream->cancelled)) return UPSTREAM_CANCELLED;
    CURL *easy = curl_easy_init();
    if (!easy) {
        snprintf(error, error_size, "curl_easy_init failed");
        return UPSTREAM_FAILED;
    }
    struct curl_slist *headers = headers_for(api_key, 1);
    configure(easy, socket_path, url, headers, body);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, deliver);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, stream);
    curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, read_header);
    curl_easy_setopt(easy, CURLOPT_HEADERDATA, &stream->retry_after_ms);
    stream->easy = easy;
    stream->on_data = on_data;
    stream->context = context;
    curl_multi_add_handle(stream->multi, easy);

    CURLcode code = CURLE_OK;
    int finished = 0;
    while (!finished && !stream->aborted && !atomic_load(&stream->cancelled)) {
        int running = 0;
        if (curl_multi_perform(stream->multi, &running) != CURLM_OK) {
            code = CURLE_FAILED_INIT;
            break;
        }
        int queued;
        CURLMsg *message;
        while ((message = curl_multi_info_read(stream->multi, &queued))) {
            if (message->msg == CURLMSG_DONE) {
                code = message->data.result;
                finished = 1;
            }
        }
        if (finished) break;
        if (on_tick && on_tick(context) != 0) {
            stream->aborted = 1;
            break;
        }
        if (running) curl_multi_poll(stream->multi, NULL, 0, UPSTREAM_TICK_MS, NULL);
    }
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, http_status);
    /* Removing and cleaning up the handle closes its connection (reuse is forbidden). */
    curl_multi_remove_handle(stream->multi, easy);
    curl_easy_cleanup(easy);
    curl_slist_free_all(headers);
    stream->easy = NULL;

    if (atomic_load(&stream->cancelled)) return UPSTREAM_CANCELLED;
    if (stream->aborted) return UPSTREAM_ABORTED;
    if (code != CURLE_OK) {
        snprintf(error, error_size, "%s", curl_easy_strerror(code));
        return code == CURLE_OPERATION_TIMEDOUT ? UPSTREAM_TIMED_OUT : UPSTREAM_FAILED;
    }
    return UPSTREAM_COMPLETED;
}
