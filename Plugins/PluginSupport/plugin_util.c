#include "plugin_util.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

void plugin_log(const pb_host_api *host, pb_log_level level, const char *fmt, ...) {
    if (!host || !host->log) return;
    char line[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    host->log(host->context, level, line);
}

void plugin_set_error(char *error, size_t size, const char *fmt, ...) {
    if (!error || size == 0) return;
    va_list args;
    va_start(args, fmt);
    int length = vsnprintf(error, size, fmt, args);
    va_end(args);
    /* Cut short: drop a last character that lost bytes, so the message stays valid UTF-8. */
    if (length >= 0 && (size_t)length >= size) {
        size_t kept = size - 1, start = kept;
        while (start > 0 && ((unsigned char)error[start - 1] & 0xC0) == 0x80) start--;
        if (start > 0) {
            unsigned char lead = (unsigned char)error[start - 1];
            size_t width = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
            if (kept - (start - 1) < width) error[start - 1] = '\0';
        }
    }
}

double plugin_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

void plugin_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}
