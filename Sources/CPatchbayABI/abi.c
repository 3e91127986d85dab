#include "patchbay.h"
