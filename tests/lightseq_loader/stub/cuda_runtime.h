// Stand-in: see cuda.h.
#pragma once
#include "cuda.h"
