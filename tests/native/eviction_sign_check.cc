// Evaluates the eviction sign's rules (eviction_sign.h) on the CPU for the
// queries on the command line, one result word per query:
//   sign PLACED SEEN FREE_NOW                 -> 1 or 0 (EvictionSignShows)
//   watch PLACED SEEN FREE_NOW FULL IDLE_MS   -> 1 or 0 (WatchRestores)
//   full FREE TOTAL                           -> 1 or 0 (DeviceFull)
//   probe SEEN FREE_BEFORE FREE_AFTER         -> the reference kept (SeenAfterProbe)
// Sizes in MiB. An unknown query or a missing argument exits with 2.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "eviction_sign.h"

using namespace optax_paged8bit;

namespace {

size_t MiB(const char* text) { return static_cast<size_t>(std::strtoull(text, nullptr, 10)) << 20; }

}  // namespace

int main(int argc, char** argv) {
  int i = 1;
  auto need = [&](int n) {
    if (i + n >= argc + 1) {
      std::printf("missing arguments for %s\n", argv[i - 1]);
      std::exit(2);
    }
  };
  while (i < argc) {
    const char* op = argv[i++];
    if (std::strcmp(op, "sign") == 0) {
      need(3);
      std::printf("%d\n", EvictionSignShows(MiB(argv[i]), MiB(argv[i + 1]), MiB(argv[i + 2])));
      i += 3;
    } else if (std::strcmp(op, "watch") == 0) {
      need(5);
      bool full = std::strcmp(argv[i + 3], "1") == 0;
      double idle_s = std::strtod(argv[i + 4], nullptr) / 1000.0;
      std::printf("%d\n",
                  WatchRestores(MiB(argv[i]), MiB(argv[i + 1]), MiB(argv[i + 2]), full, idle_s));
      i += 5;
    } else if (std::strcmp(op, "full") == 0) {
      need(2);
      std::printf("%d\n", DeviceFull(MiB(argv[i]), MiB(argv[i + 1])));
      i += 2;
    } else if (std::strcmp(op, "probe") == 0) {
      need(3);
      std::printf("%zu\n", SeenAfterProbe(MiB(argv[i]), MiB(argv[i + 1]), MiB(argv[i + 2])) >> 20);
      i += 3;
    } else {
      std::printf("unknown query %s\n", op);
      return 2;
    }
  }
  return 0;
}
