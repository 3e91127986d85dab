/* Broken on purpose: every run ends with two FINISH events (patchbay.h, pb_event_sink:
 * "exactly one terminal event"). Caught by: terminal-event[chat]. */
#define BROKEN_TWO_TERMINAL_EVENTS
#include "../minimal_plugin.c"
