/* Broken on purpose: an engine function is exported besides pb_plugin_entry ("A plugin
 * ... exports exactly one symbol"). Caught by: exports. */
#define BROKEN_EXPORTED_ENGINE_SYMBOL
#include "../minimal_plugin.c"
