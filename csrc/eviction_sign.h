// When a GPU slot's pages count as evicted by the driver, and when the
// eviction watch brings them back (cuda_ops.cc). The step's check before its
// kernel and the watch between steps read the same sign: free device memory
// risen, since the slot's last step, by more than a sixteenth of the slot's
// device-homed bytes (evicted pages leave free memory higher once the spike
// that took them is gone). Pure functions, so that the CPU tests check them
// (tests/native/eviction_sign_check.cc).
#ifndef OPTAX_PAGED8BIT_EVICTION_SIGN_H_
#define OPTAX_PAGED8BIT_EVICTION_SIGN_H_

#include <algorithm>
#include <cstddef>

namespace optax_paged8bit {

constexpr size_t kEvictionSignMinBytes = size_t{2} << 20;

// The rise of free memory that counts for `placed` device-homed bytes.
inline size_t EvictionSign(size_t placed) { return std::max(kEvictionSignMinBytes, placed / 16); }

// Whether free memory `free_now` shows the sign for a slot with `placed`
// device-homed bytes whose last step saw `seen` free (0: nothing to compare
// with, as after a step that moved the slot's pages itself).
inline bool EvictionSignShows(size_t placed, size_t seen, size_t free_now) {
  return placed > 0 && seen > 0 && free_now > seen + EvictionSign(placed);
}

// A device counts as full (the driver evicts only then) when free memory is
// under a thirty-second of it.
inline bool DeviceFull(size_t free_now, size_t total) { return free_now < total / 32; }

// A slot stepped more often than this is left to its steps' own check unless
// its device was seen full: free memory also rises when XLA's allocator
// hands a step's buffers back, which is no eviction.
constexpr double kWatchIdleSeconds = 0.3;

// Whether the watch restores a slot now: the sign shows, and the device was
// seen full since the watch's last look or the slot had no step for
// `idle_s` >= kWatchIdleSeconds.
inline bool WatchRestores(size_t placed, size_t seen, size_t free_now, bool full, double idle_s) {
  return EvictionSignShows(placed, seen, free_now) && (full || idle_s >= kWatchIdleSeconds);
}

// The reference a slot keeps after a residency probe during which free
// memory fell from `free_before` to `free_after`: the probe's loads of
// evicted pages make the driver take device memory for them (free memory
// falls back by what the eviction freed), which would otherwise hide the
// sign from the next step and the watch.
inline size_t SeenAfterProbe(size_t seen, size_t free_before, size_t free_after) {
  if (seen == 0 || free_after >= free_before) return seen;
  return seen - std::min(seen, free_before - free_after);
}

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_EVICTION_SIGN_H_
