// fmemu stand-in for the CUDA header of this name (see fmemu.h)
#pragma once
#include "fmemu.h"
