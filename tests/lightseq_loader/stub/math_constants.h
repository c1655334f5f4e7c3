// Stand-in for CUDA's math_constants.h: tools/util.h includes it; the loaders use none of its constants.
#pragma once
