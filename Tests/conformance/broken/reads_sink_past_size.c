/* Broken on purpose: run_execute reads a field of a newer header's pb_event_sink without
 * PB_HAS, past the host's struct_size. Caught by: struct-bounds. */
#define BROKEN_READS_SINK_PAST_SIZE
#include "../minimal_plugin.c"
