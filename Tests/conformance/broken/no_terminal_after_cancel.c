/* Broken on purpose: a cancelled run returns from run_execute without a terminal event
 * ("Every run that run_execute accepted ends with exactly one terminal event ..., also when
 * it was cancelled"). Caught by: terminal-event[chat]. */
#define BROKEN_NO_TERMINAL_AFTER_CANCEL
#include "../minimal_plugin.c"
