// Emulator stand-in for <cooperative_groups.h>: this_grid().sync() as a barrier of every
// thread of a cooperative launch.
#pragma once
#include "emu_core.hpp"

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    if (cf_emu::ctx.grid == nullptr) {
      std::fprintf(stderr, "calm_fast CUDA emulator: grid.sync() in a kernel not launched cooperatively\n");
      std::abort();
    }
    cf_emu::ctx.grid->wait("grid.sync()");
  }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups
