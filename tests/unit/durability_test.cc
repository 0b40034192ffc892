// Durability steps of the write path under simulated power cuts: what a
// close, a periodic flush and a failed fdatasync leave on disk.

#include "gtest/gtest.h"
