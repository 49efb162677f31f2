// The process-wide store of optimizer state (SPEC 5.1).
//
// A slot holds the 8-bit codes, block scales and float32 moments of every
// leaf of one optimizer state on one device. Slots are keyed by
// (handle, platform, device ordinal). The handle is a uint32 leaf of the
// optax state, and it has two kinds of values:
//  - a fresh token (bit 31 set, the low bits the layout key): what `init`
//    returns, a state with no moments yet. It is a constant, so a jitted or
//    vmapped init yields it as well as an eager one. The first update of a
//    fresh state (at count 0) allocates a new handle and a zeroed slot and
//    returns the handle as an output of the call, next to the count;
//  - a live handle (below 2^31), handed out by the registry at that first
//    update or at an import. Each allocation takes a new value, so the slot
//    of a handle is on one device only; with sharded params every device
//    holds its own value in its buffer of the (replicated) handle array.
// Live handles of a process start at a random base, so that a handle saved
// by another process (a checkpoint of the opt_state itself, without its
// moments) is almost never mistaken for one of this process. Released handles
// are tombstoned. Slots whose handle no jax.Array holds any more are freed by
// Collect, which the Python side's collector drives
// (optax_paged8bit/_collector.py says how it knows).
//
// The registry knows nothing about CUDA: each backend passes the allocator
// that places its memory (host memory on the CPU, managed memory on a GPU).
#ifndef OPTAX_PAGED8BIT_REGISTRY_H_
#define OPTAX_PAGED8BIT_REGISTRY_H_

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace optax_paged8bit {

// Builds error messages without iostreams: a Python process can hold several
// C++ runtimes (jaxlib's, a framework's), and an ostream's locale machinery
// crashed in one of them (seen with jax 0.11.2 on an H200 machine).
class Message {
 public:
  Message& operator<<(const char* text) {
    text_ += text;
    return *this;
  }
  Message& operator<<(const std::string& text) {
    text_ += text;
    return *this;
  }
  template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
  Message& operator<<(T value) {
    text_ += std::to_string(value);
    return *this;
  }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

enum class Platform : int { kCpu = 0, kCuda = 1 };

// The fresh-token bit of a handle value (see above).
constexpr uint32_t kFreshBit = 0x80000000u;
inline bool IsFreshToken(uint32_t bits) { return (bits & kFreshBit) != 0; }
inline uint32_t FreshLayoutKey(uint32_t bits) { return bits & ~kFreshBit; }

const char* PlatformName(Platform platform);

// Shape of one leaf's state, as the custom call and the slot see it.
struct LeafSpec {
  int64_t size = 0;        // elements of the param
  bool is_8bit = false;    // codes + scales; else float32 moments
  int64_t num_scales = 0;  // scales per moment (0 for float32 leaves)

  bool operator==(const LeafSpec& other) const {
    return size == other.size && is_8bit == other.is_8bit && num_scales == other.num_scales;
  }
  // Bytes of one moment's values (codes or float32).
  size_t state_bytes() const { return static_cast<size_t>(size) * (is_8bit ? 1 : 4); }
  size_t scale_bytes() const { return static_cast<size_t>(num_scales) * sizeof(float); }
};

// A slot's leaves lie in one arena, leaf after leaf: state1, state2, absmax1,
// absmax2, each rounded up to kArenaAlign bytes (an empty array takes none).
// The staged moments of a step split into several calls (ffi_common.h's
// StepChunk) have the same layout, so that one copy moves a call's leaves.
constexpr size_t kArenaAlign = 256;
inline size_t ArenaRound(size_t bytes) {
  return (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
}
inline size_t LeafArenaBytes(const LeafSpec& spec) {
  return 2 * ArenaRound(spec.state_bytes()) + 2 * ArenaRound(spec.scale_bytes());
}

// One allocation owned by a slot. `free_fn` is the backend's deallocator
// (given the slot's device).
// On a GPU its first `device_bytes` are homed on the device and the rest in
// host RAM (the oversubscription guard places there what does not fit);
// `on_host` says whether the device-homed bytes are paged out now. A GPU
// slot with no room on the device at all is `pinned`: page-locked host
// memory, which never moves (device_bytes 0, on_host). On the CPU every byte
// is in host RAM.
struct Memory {
  void* data = nullptr;
  size_t bytes = 0;
  size_t device_bytes = 0;
  bool on_host = true;
  bool pinned = false;
  void (*free_fn)(void* data, int device) = nullptr;

  size_t bytes_on_host() const { return on_host ? bytes : bytes - device_bytes; }
  // Whether [begin, end) of the memory lies (in part) in host RAM.
  bool HostPart(const void* begin, const void* end) const {
    const char* base = static_cast<const char*>(data);
    return begin < end && (on_host || static_cast<const char*>(end) > base + device_bytes);
  }
};

// Places zero-initialised memory for a slot; returns nullptr data on failure
// and says why in `error`.
struct Allocator {
  virtual ~Allocator() = default;
  virtual Memory Allocate(size_t bytes, std::string* error) = 0;
};

struct LeafState {
  void* state1 = nullptr;    // uint8 codes or float32 first moment, [size]
  void* state2 = nullptr;    // uint8 codes or float32 second moment, [size]
  float* absmax1 = nullptr;  // [num_scales]
  float* absmax2 = nullptr;  // [num_scales]
};

using Clock = std::chrono::steady_clock;

struct Slot {
  int64_t step = 0;                 // the count of the state that may update it next
  uint64_t last_use = 0;            // the registry's epoch when a call last acquired it
  Clock::time_point last_use_time;  // and when
  double use_interval_s = 0;        // between the last two acquisitions
  Platform platform = Platform::kCpu;
  int device = 0;
  uint32_t layout_key = 0;  // the Python layout the slot was made for
  std::vector<LeafSpec> layout;
  std::vector<LeafState> leaves;
  std::vector<Memory> memory;
  char* arena = nullptr;        // the leaves' memory (null when every leaf is empty)
  std::vector<size_t> offsets;  // arena bytes before leaf i's arrays; [num leaves] = all
  // CUDA: free device memory (cudaMemGetInfo) when the slot last ran; a rise
  // since then is the sign that the driver evicted its pages (cuda_ops.cc).
  size_t device_free_seen = 0;
  Clock::time_point device_free_seen_at;  // when
  int64_t evictions_seen = 0;             // steps that found the sign and prefetched
  int64_t evictions_restored = 0;         // the same found between steps (the eviction watch)
  // The watch's prefetch is in flight (the slot's write-back event marks its
  // end): the next step waits for it before its kernel.
  bool restore_pending = false;
  // CUDA: steps that streamed leaves from host RAM, and the last one's bytes
  // each way (a step of several calls adds up its calls' in `streaming`).
  int64_t streamed_steps = 0;
  size_t streamed_bytes = 0;
  size_t streaming = 0;
  // CUDA: the copies that write a streamed step's moments back to host RAM
  // run after the step's call returns (cuda_ops.cc). `write_back` marks their
  // end (null: none yet); every call that touches the memory waits for it, and
  // `drop_write_back` (waits, then destroys it) runs before the memory is freed.
  void* write_back = nullptr;
  void (*drop_write_back)(void*) = nullptr;
  std::mutex mu;  // held while a call reads or writes the slot

  ~Slot();
  size_t bytes() const;
};

class Registry {
 public:
  static Registry& Global();

  // Frees every slot of the handle and tombstones it. Releasing twice is a
  // no-op; returns the number of bytes freed.
  size_t Release(int32_t handle);
  bool IsReleased(int32_t handle);

  // The collector's calls (optax_paged8bit/_collector.py says when it may
  // free at once and why it otherwise retires first).
  //
  // Epoch() marks the start of a scan: every acquisition after it is newer.
  // Collect(held, candidates, mark, ...) decides on each candidate handle
  // with slots that is not in `held` (the handles the scan found in live
  // jax.Arrays):
  //  - a call acquired it since `mark`, or since it was retired: it is in use
  //    (counted in Outcome::busy, so the caller looks again), and live;
  //  - with kFreeNow, its slots are freed;
  //  - otherwise it is retired, if it was not: listed in Outcome::retired
  //    (the caller pages its memory out). A retired handle that a call
  //    acquires again, or a scan finds held, is live again;
  //  - a retired handle is due once it stayed unheld and unused for the
  //    grace: 2 more scans, and max(grace_min_s, grace_intervals x the time
  //    between its slots' last two uses) seconds since its last use. kRetire
  //    counts the due ones (Outcome::due); kRetireAndFree frees them.
  // Every held handle is recorded as seen held at `mark`. Using a collected
  // handle is an error that names the collector.
  enum class Mode : int { kFreeNow = 0, kRetire = 1, kRetireAndFree = 2 };
  struct Decision {
    Mode mode = Mode::kRetire;
    double grace_min_s = 0;
    double grace_intervals = 0;
  };
  struct Outcome {
    size_t freed = 0;  // bytes
    size_t busy = 0;
    size_t due = 0;
    std::vector<int32_t> retired;
    bool calls_running = false;  // a call was in progress (see CallBegins)
  };
  uint64_t Epoch();
  Outcome Collect(const std::vector<int32_t>& held, const std::vector<int32_t>& candidates,
                  uint64_t mark, const Decision& decision);
  // The handles worth a scan now: those none of whose slots a call acquired
  // for max(idle_s, idle_intervals x the time between their last two uses)
  // seconds (a state being stepped is held, and between two of its steps it
  // may be in the hands of a dispatch that donated it), leaving out those a
  // scan found held after their last use, less than `recheck_s` seconds ago.
  // Retired handles stay candidates. *next_s is the time until another handle
  // qualifies or a retired one's grace ends (-1 when none will without a
  // call).
  std::vector<int32_t> IdleHandles(double idle_s, double idle_intervals, double recheck_s,
                                   const Decision& decision, double* next_s);
  // Whether a handle is retired (tests and slot_info).
  bool IsRetired(int32_t handle);
  // Calls that read or write states (update, export, import) say when they
  // begin, before they read the handle (on a GPU that read waits for the
  // work queued before the call: the forward and backward pass of a step
  // that was given its state with donation), and when they end. A retired
  // handle is not due while a call that began before its retirement runs.
  // CallScope does both.
  uint64_t CallBegins();
  void CallEnds(uint64_t begun);
  // Wakes the collector's thread (a slot was made, a full garbage collection
  // ran, a state was created). It never touches the registry's lock, so the
  // garbage collector's callback may call it at any time.
  void RequestScan();
  // Waits until RequestScan is called or `timeout_s` passes (forever when
  // negative); returns whether it was called, and clears the request.
  bool WaitForScanRequest(double timeout_s);
  // Handles that have at least one slot.
  std::vector<int32_t> HandlesWithSlots();
  // Every slot (the eviction watch's look at them; not a use).
  std::vector<std::shared_ptr<Slot>> AllSlots();

  // What every acquisition below is given: the state's handle value (a fresh
  // token or a live handle), where the call runs, the layout it was compiled
  // for (its key and its leaves).
  struct Request {
    uint32_t handle_bits = 0;
    uint32_t layout_key = 0;
    Platform platform = Platform::kCpu;
    int device = 0;
    const std::vector<LeafSpec>* layout = nullptr;
  };

  // The slot an update at `count` may advance, and the handle the update
  // returns. A fresh token at count 0 gets a new handle and a zeroed slot.
  // Fails (returns a message, *slot untouched) for a fresh token at another
  // count, an unknown, released or collected handle, a layout that differs
  // from the slot's, or a count that is not the slot's step (a stale or
  // reused state).
  std::string AcquireForUpdate(const Request& request, int64_t count, Allocator& allocator,
                               std::shared_ptr<Slot>* slot, int32_t* handle_out);

  // What AcquireForUpdate would fail with ("" when it would succeed), without
  // creating anything: lets the host check an eager call before issuing it.
  std::string CheckUpdate(const Request& request, int64_t count);

  // The slot to read for an export of a state at `count`, and the step its
  // moments are at (*step_out). *slot is null for a fresh token (all zeros,
  // step 0). A live state may be one step behind its slot: an update ran but
  // its result never reached Python (an interrupted or failed step); the
  // caller is told through *step_out. Further behind is stale.
  std::string AcquireForRead(const Request& request, int64_t count, std::shared_ptr<Slot>* slot,
                             int64_t* step_out);

  // What AcquireForRead would fail with ("" when it would succeed): an eager
  // export is checked on the host before its call is issued. A failed call
  // with side effects leaves JAX's runtime token of its device in error, so
  // every later jax.effects_barrier() would raise the same error again.
  std::string CheckRead(const Request& request, int64_t count);

  // A new handle and a slot (with `layout`) to fill with imported state.
  // Importing never reuses the target state's slot, so no older state object
  // can step on moments that are not its own.
  std::string AcquireForImport(const Request& request, Allocator& allocator,
                               std::shared_ptr<Slot>* slot, int32_t* handle_out);

  // Every slot of a handle (for paging and residency queries). `touch`
  // counts as a use (the collector's own paging of a retired handle does not).
  std::string SlotsOf(int32_t handle, std::vector<std::shared_ptr<Slot>>* slots, bool touch = true);

  // Bytes held by all live slots.
  size_t TotalBytes();

 private:
  Registry();
  using Key = std::tuple<int32_t, int, int>;  // handle, platform, device
  enum class Fate : uint8_t { kLive, kReleased, kCollected };
  struct HandleInfo {
    Fate fate = Fate::kLive;
    uint64_t seen_held = 0;  // mark of the latest scan that found it held (0: none)
    Clock::time_point seen_held_time;
    bool retired = false;       // found unheld; its memory paged out, not freed
    uint64_t retired_mark = 0;  // the mark of the scan that retired it
    int unheld_scans = 0;       // scans since then that found it unheld and unused
  };
  // The latest use of each handle's slots, and the interval before it.
  struct Use {
    uint64_t epoch = 0;
    Clock::time_point time;
    double interval_s = 0;
  };
  std::map<int32_t, Use> LastUsesLocked() const;
  double GraceLocked(const Use& use, const Decision& decision) const;
  HandleInfo* InfoLocked(int32_t handle);
  const HandleInfo* InfoLocked(int32_t handle) const;
  std::string CheckHandleLocked(int32_t handle) const;
  std::string FindForUpdateLocked(const Request& request, int64_t count,
                                  std::shared_ptr<Slot>* slot);
  std::string FindForReadLocked(const Request& request, int64_t count, std::shared_ptr<Slot>* slot,
                                int64_t* step_out) const;
  std::string CreateSlotLocked(const Request& request, Allocator& allocator,
                               std::shared_ptr<Slot>* slot, int32_t* handle_out);
  // The reason a live handle has no slot here: collected, or made on another
  // device (the error says which).
  std::string MissingSlotLocked(int32_t handle, const Request& request, int64_t count) const;
  // The slot of a non-fresh handle for this call's platform and device, or
  // why there is none (released, collected, never made on this device, made
  // for params of other shapes).
  std::string FindSlotLocked(const Request& request, int64_t count,
                             std::shared_ptr<Slot>* slot) const;
  void TouchLocked(Slot& slot) {
    Clock::time_point now = Clock::now();
    if (slot.last_use != 0) {
      slot.use_interval_s = std::chrono::duration<double>(now - slot.last_use_time).count();
    }
    slot.last_use = ++epoch_;
    slot.last_use_time = now;
  }
  // Moves the slots of the handles `doomed_handle` accepts out of the map.
  template <typename Pred>
  std::vector<std::shared_ptr<Slot>> TakeSlotsLocked(Pred doomed_handle);
  // Waits until no call uses the slots and returns their bytes; the memory
  // goes when the caller drops them.
  static size_t BytesOnceUnused(const std::vector<std::shared_ptr<Slot>>& doomed);

  std::mutex mu_;
  int32_t first_handle_ = 1;  // this process's random base
  int32_t next_handle_ = 1;
  uint64_t epoch_ = 0;
  std::vector<HandleInfo> handles_;  // indexed by handle - first_handle_
  std::map<Key, std::shared_ptr<Slot>> slots_;

  std::multiset<uint64_t> calls_begun_;  // the epoch at which each running call began

  // RequestScan's flag, under its own lock (never held with mu_ taken after).
  std::mutex scan_mu_;
  std::condition_variable scan_cv_;
  bool scan_requested_ = false;
};

// Marks a handler's run as a call in progress (Registry::CallBegins).
class CallScope {
 public:
  CallScope() : begun_(Registry::Global().CallBegins()) {}
  ~CallScope() { Registry::Global().CallEnds(begun_); }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  uint64_t begun_;
};

// Human-readable description of a layout difference, or "" when equal.
std::string DescribeLayoutMismatch(const std::vector<LeafSpec>& expected,
                                   const std::vector<LeafSpec>& got);

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_REGISTRY_H_
