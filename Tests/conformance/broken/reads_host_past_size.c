/* Broken on purpose: pb_plugin_entry reads a field of a newer header's pb_host_api without
 * PB_HAS, past the host's struct_size ("a reader touches a field only when it lies inside
 * the writer's struct_size"). Caught by: struct-bounds. */
#define BROKEN_READS_HOST_PAST_SIZE
#include "../minimal_plugin.c"
