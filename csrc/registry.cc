#include "registry.h"

#include <algorithm>
#include <climits>
#include <random>
#include <set>

namespace optax_paged8bit {

const char* PlatformName(Platform platform) { return platform == Platform::kCuda ? "cuda" : "cpu"; }

Slot::~Slot() {
  if (write_back != nullptr && drop_write_back != nullptr) drop_write_back(write_back);
  for (Memory& m : memory) {
    if (m.data != nullptr && m.free_fn != nullptr) m.free_fn(m.data, device);
  }
}

size_t Slot::bytes() const {
  size_t total = 0;
  for (const Memory& m : memory) total += m.bytes;
  return total;
}

Registry& Registry::Global() {
  static Registry* registry = new Registry();  // never destroyed: outlives XLA
  return *registry;
}

// Live handles of this process are first_handle_, first_handle_ + 1, ... from
// a random base in [2^28, 2^29): below the fresh-token bit, above the small
// integers that other uint32 scalars (step counters) hold, and different from
// another process's handles but by a rare chance.
Registry::Registry() {
  std::random_device entropy;
  first_handle_ = static_cast<int32_t>((1u << 28) + (entropy() & ((1u << 28) - 1)));
  next_handle_ = first_handle_;
}

Registry::HandleInfo* Registry::InfoLocked(int32_t handle) {
  if (handle < first_handle_ || handle >= next_handle_) return nullptr;
  return &handles_[handle - first_handle_];
}

const Registry::HandleInfo* Registry::InfoLocked(int32_t handle) const {
  if (handle < first_handle_ || handle >= next_handle_) return nullptr;
  return &handles_[handle - first_handle_];
}

bool Registry::IsReleased(int32_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  const HandleInfo* info = InfoLocked(handle);
  return info != nullptr && info->fate == Fate::kReleased;
}

template <typename Pred>
std::vector<std::shared_ptr<Slot>> Registry::TakeSlotsLocked(Pred doomed_handle) {
  std::vector<std::shared_ptr<Slot>> doomed;
  for (auto it = slots_.begin(); it != slots_.end();) {
    if (doomed_handle(std::get<0>(it->first))) {
      doomed.push_back(std::move(it->second));
      it = slots_.erase(it);
    } else {
      ++it;
    }
  }
  return doomed;
}

size_t Registry::BytesOnceUnused(const std::vector<std::shared_ptr<Slot>>& doomed) {
  size_t bytes = 0;
  for (const auto& slot : doomed) {
    std::lock_guard<std::mutex> wait_for_users(slot->mu);
    bytes += slot->bytes();
  }
  return bytes;
}

size_t Registry::Release(int32_t handle) {
  std::vector<std::shared_ptr<Slot>> doomed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    HandleInfo* info = InfoLocked(handle);
    if (info == nullptr) return 0;
    info->fate = Fate::kReleased;
    doomed = TakeSlotsLocked([handle](int32_t h) { return h == handle; });
  }
  return BytesOnceUnused(doomed);  // the slots are freed when `doomed` goes out of scope
}

uint64_t Registry::Epoch() {
  std::lock_guard<std::mutex> lock(mu_);
  return ++epoch_;
}

std::vector<int32_t> Registry::HandlesWithSlots() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int32_t> handles;
  for (auto& [key, slot] : slots_) {
    int32_t handle = std::get<0>(key);
    if (handles.empty() || handles.back() != handle) handles.push_back(handle);  // keys are sorted
  }
  return handles;
}

std::vector<std::shared_ptr<Slot>> Registry::AllSlots() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<Slot>> slots;
  for (auto& [key, slot] : slots_) slots.push_back(slot);
  return slots;
}

std::map<int32_t, Registry::Use> Registry::LastUsesLocked() const {
  std::map<int32_t, Use> uses;
  for (auto& [key, slot] : slots_) {
    Use& use = uses[std::get<0>(key)];
    if (slot->last_use >= use.epoch) {
      use.epoch = slot->last_use;
      use.time = slot->last_use_time;
      use.interval_s = slot->use_interval_s;
    }
  }
  return uses;
}

double Registry::GraceLocked(const Use& use, const Decision& decision) const {
  return std::max(decision.grace_min_s, decision.grace_intervals * use.interval_s);
}

namespace {

double SecondsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

Registry::Outcome Registry::Collect(const std::vector<int32_t>& held,
                                    const std::vector<int32_t>& candidates, uint64_t mark,
                                    const Decision& decision) {
  std::set<int32_t> held_set(held.begin(), held.end());
  std::vector<std::shared_ptr<Slot>> doomed;
  Outcome outcome;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Clock::time_point now = Clock::now();
    std::map<int32_t, Use> uses = LastUsesLocked();
    for (int32_t handle : held_set) {
      HandleInfo* info = InfoLocked(handle);
      if (info == nullptr || uses.count(handle) == 0) continue;
      info->seen_held = mark;
      info->seen_held_time = now;
      info->retired = false;
    }
    std::set<int32_t> freeing;
    for (int32_t handle : candidates) {
      auto it = uses.find(handle);
      if (it == uses.end() || held_set.count(handle) != 0) continue;
      const Use& use = it->second;
      HandleInfo* info = InfoLocked(handle);
      if (use.epoch >= mark || (info->retired && use.epoch >= info->retired_mark)) {
        ++outcome.busy;  // a call ran while the scan looked, or since its retirement
        info->retired = false;
      } else if (decision.mode == Mode::kFreeNow) {
        freeing.insert(handle);
      } else if (!info->retired) {
        info->retired = true;
        info->retired_mark = mark;
        info->unheld_scans = 0;
        outcome.retired.push_back(handle);
      } else if (++info->unheld_scans >= 2 &&
                 SecondsBetween(use.time, now) >= GraceLocked(use, decision) &&
                 (calls_begun_.empty() || *calls_begun_.begin() > info->retired_mark)) {
        ++outcome.due;
        if (decision.mode == Mode::kRetireAndFree) freeing.insert(handle);
      }
    }
    for (int32_t handle : freeing) {
      HandleInfo* info = InfoLocked(handle);
      info->fate = Fate::kCollected;
      info->retired = false;
    }
    doomed = TakeSlotsLocked([&freeing](int32_t h) { return freeing.count(h) != 0; });
    outcome.calls_running = !calls_begun_.empty();
  }
  outcome.freed = BytesOnceUnused(doomed);
  return outcome;
}

std::vector<int32_t> Registry::IdleHandles(double idle_s, double idle_intervals, double recheck_s,
                                           const Decision& decision, double* next_s) {
  std::lock_guard<std::mutex> lock(mu_);
  Clock::time_point now = Clock::now();
  std::vector<int32_t> idle;
  double next = -1;
  auto wait = [&next](double s) { next = next < 0 ? s : std::min(next, s); };
  for (auto& [handle, use] : LastUsesLocked()) {
    double unused_for = SecondsBetween(use.time, now);
    double quiet = std::max(idle_s, idle_intervals * use.interval_s);
    if (unused_for < quiet) {
      wait(quiet - unused_for);
      continue;
    }
    const HandleInfo* info = InfoLocked(handle);
    if (info->retired) {
      idle.push_back(handle);  // looked at until freed or revived
      wait(std::max(0.0, GraceLocked(use, decision) - unused_for));
      continue;
    }
    if (info->seen_held > use.epoch) {  // found held since its last use
      double seen_ago = SecondsBetween(info->seen_held_time, now);
      if (seen_ago < recheck_s) {
        wait(recheck_s - seen_ago);
        continue;
      }
    }
    idle.push_back(handle);
  }
  *next_s = next;
  return idle;
}

uint64_t Registry::CallBegins() {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t begun = ++epoch_;
  calls_begun_.insert(begun);
  return begun;
}

void Registry::CallEnds(uint64_t begun) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = calls_begun_.find(begun);
  if (it != calls_begun_.end()) calls_begun_.erase(it);
}

bool Registry::IsRetired(int32_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  const HandleInfo* info = InfoLocked(handle);
  return info != nullptr && info->retired;
}

void Registry::RequestScan() {
  {
    std::lock_guard<std::mutex> lock(scan_mu_);
    scan_requested_ = true;
  }
  scan_cv_.notify_all();
}

bool Registry::WaitForScanRequest(double timeout_s) {
  std::unique_lock<std::mutex> lock(scan_mu_);
  auto requested = [this] { return scan_requested_; };
  if (timeout_s < 0) {
    scan_cv_.wait(lock, requested);
  } else {
    scan_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), requested);
  }
  bool was = scan_requested_;
  scan_requested_ = false;
  return was;
}

namespace {

const char kHowToSave[] =
    " Save a paged state with optax_paged8bit.save_checkpoint(path, tree) (or "
    "optax_paged8bit.export_state before any other serializer) and resume with "
    "optax_paged8bit.restore_checkpoint: a checkpoint of the opt_state itself (a plain orbax "
    "save, pickle, jax.device_get) holds only its count and handle, not the moments.";

}  // namespace

std::string Registry::CheckHandleLocked(int32_t handle) const {
  Message msg;
  const HandleInfo* info = InfoLocked(handle);
  if (info == nullptr) {
    msg << "optimizer state handle " << handle
        << " was not created in this process: the opt_state was probably restored from a "
           "checkpoint written by another process."
        << kHowToSave;
    return msg.str();
  }
  if (info->fate == Fate::kReleased) {
    msg << "optimizer state handle " << handle
        << " was released (optax_paged8bit.release was called on this state or on an older "
           "copy of it); create a new state with tx.init(params).";
    return msg.str();
  }
  return "";
}

std::string Registry::MissingSlotLocked(int32_t handle, const Request& request,
                                        int64_t count) const {
  Message msg;
  msg << "optimizer state handle " << handle << " has no stored state on "
      << PlatformName(request.platform) << ":" << request.device << " (its count is " << count
      << ")";
  if (InfoLocked(handle)->fate == Fate::kCollected) {
    msg << ". Its memory was freed by optax_paged8bit's collector because no live jax.Array "
           "held the handle: the state was dropped, or kept only as a host copy "
           "(jax.device_get, pickle). Keep the opt_state as jax arrays while it is in use."
        << kHowToSave;
  } else {
    msg << ": its moments live on another device. Keep a state on the devices it was created "
           "on (a resharded or moved opt_state cannot find its moments).";
  }
  return msg.str();
}

std::string Registry::CreateSlotLocked(const Request& request, Allocator& allocator,
                                       std::shared_ptr<Slot>* out, int32_t* handle_out) {
  const std::vector<LeafSpec>& layout = *request.layout;
  auto slot = std::make_shared<Slot>();
  slot->platform = request.platform;
  slot->device = request.device;
  slot->layout = layout;
  slot->layout_key = request.layout_key;
  slot->leaves.resize(layout.size());
  // One allocation (arena) per slot: one prefetch or advice call moves it all.
  slot->offsets.assign(1, 0);
  for (const LeafSpec& spec : layout) {
    slot->offsets.push_back(slot->offsets.back() + LeafArenaBytes(spec));
  }
  size_t total = slot->offsets.back();
  std::string error;
  if (total > 0) {
    Memory m = allocator.Allocate(total, &error);
    if (m.data == nullptr) {
      Message msg;
      msg << "could not allocate optimizer state on " << PlatformName(request.platform) << ":"
          << request.device << ": " << error;
      return msg.str();
    }
    slot->memory.push_back(m);
    slot->arena = static_cast<char*>(m.data);
  }
  char* next = slot->arena;
  auto carve = [&](size_t bytes) -> void* {
    if (bytes == 0) return nullptr;
    void* p = next;
    next += ArenaRound(bytes);
    return p;
  };
  for (size_t i = 0; i < layout.size(); ++i) {
    LeafState& leaf = slot->leaves[i];
    leaf.state1 = carve(layout[i].state_bytes());
    leaf.state2 = carve(layout[i].state_bytes());
    leaf.absmax1 = static_cast<float*>(carve(layout[i].scale_bytes()));
    leaf.absmax2 = static_cast<float*>(carve(layout[i].scale_bytes()));
  }
  if (next_handle_ == INT32_MAX) return "optimizer state handles are exhausted in this process";
  int32_t handle = next_handle_++;
  handles_.emplace_back();
  TouchLocked(*slot);
  slots_[Key{handle, static_cast<int>(request.platform), request.device}] = slot;
  *out = std::move(slot);
  *handle_out = handle;
  RequestScan();  // a new state's memory: a good time to look for dropped ones
  return "";
}

namespace {

std::string LayoutKeyMismatch(uint32_t have, uint32_t call) {
  Message msg;
  msg << "this opt_state was made by init for other params than this call's (layout key " << have
      << ", the call's " << call
      << "). Use the opt_state that this optimizer's init returned for these params.";
  return msg.str();
}

// The checks of a fresh token (a state init returned; its slot is made by its
// first update): made for this call's params, and still at count 0. `why`
// ends the count's error.
std::string CheckFreshToken(const Registry::Request& request, int64_t count, const char* why) {
  if (FreshLayoutKey(request.handle_bits) != request.layout_key) {
    return LayoutKeyMismatch(FreshLayoutKey(request.handle_bits), request.layout_key);
  }
  if (count == 0) return "";
  Message msg;
  msg << "this opt_state has no stored moments (the fresh handle that init returns) but its "
         "count is "
      << count << ", not 0" << why << kHowToSave;
  return msg.str();
}

}  // namespace

std::string Registry::FindSlotLocked(const Request& request, int64_t count,
                                     std::shared_ptr<Slot>* slot) const {
  int32_t handle = static_cast<int32_t>(request.handle_bits);
  std::string error = CheckHandleLocked(handle);
  if (!error.empty()) return error;
  auto it = slots_.find(Key{handle, static_cast<int>(request.platform), request.device});
  if (it == slots_.end()) return MissingSlotLocked(handle, request, count);
  std::string mismatch = DescribeLayoutMismatch(it->second->layout, *request.layout);
  if (!mismatch.empty()) {
    Message msg;
    msg << "optimizer state handle " << handle << " belongs to an optimizer over different "
        << "parameters: " << mismatch
        << ". Use the opt_state that this optimizer's init returned for these params.";
    return msg.str();
  }
  *slot = it->second;
  return "";
}

std::string Registry::FindForUpdateLocked(const Request& request, int64_t count,
                                          std::shared_ptr<Slot>* slot) {
  slot->reset();  // a fresh state: the caller creates its slot
  if (IsFreshToken(request.handle_bits)) {
    return CheckFreshToken(request, count,
                           ": it was changed by hand or restored without its moments.");
  }
  std::shared_ptr<Slot> found;
  std::string error = FindSlotLocked(request, count, &found);
  if (!error.empty()) return error;
  if (found->layout_key != request.layout_key) {
    return LayoutKeyMismatch(found->layout_key, request.layout_key);
  }
  int32_t handle = static_cast<int32_t>(request.handle_bits);
  Message msg;
  if (found->step != count) {
    msg << "stale optimizer state: handle " << handle << " on " << PlatformName(request.platform)
        << ":" << request.device << " is at step " << found->step
        << " but the update got an opt_state with count " << count
        << ". paged_adamw8bit advances its state in place, so each opt_state can be updated "
           "once. This happens when an older opt_state is reused (re-running or rolling back a "
           "step), when optax.MultiSteps or another wrapper runs the update and discards its "
           "result, or when a step's result never reached Python (Ctrl-C, or a later operation "
           "of the same jitted step failed). Always pass the opt_state returned by the previous "
           "update; accumulate gradients with optax_paged8bit.accumulate_gradients. After an "
           "interrupted step, opt_state = optax_paged8bit.import_state(tx.init(params), "
           "optax_paged8bit.export_state(opt_state)) continues from the moments as they are.";
    return msg.str();
  }
  *slot = found;
  return "";
}

std::string Registry::CheckUpdate(const Request& request, int64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<Slot> unused;
  return FindForUpdateLocked(request, count, &unused);
}

std::string Registry::AcquireForUpdate(const Request& request, int64_t count, Allocator& allocator,
                                       std::shared_ptr<Slot>* slot, int32_t* handle_out) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = FindForUpdateLocked(request, count, slot);
  if (!error.empty()) return error;
  if (*slot) {
    TouchLocked(**slot);
    *handle_out = static_cast<int32_t>(request.handle_bits);
    return "";
  }
  return CreateSlotLocked(request, allocator, slot, handle_out);
}

std::string Registry::FindForReadLocked(const Request& request, int64_t count,
                                        std::shared_ptr<Slot>* slot, int64_t* step_out) const {
  slot->reset();
  *step_out = 0;
  if (IsFreshToken(request.handle_bits)) return CheckFreshToken(request, count, ".");
  std::shared_ptr<Slot> found;
  std::string error = FindSlotLocked(request, count, &found);
  if (!error.empty()) return error;
  int32_t handle = static_cast<int32_t>(request.handle_bits);
  Message msg;
  int64_t step = found->step;
  if (step != count && step != count + 1) {
    msg << "stale optimizer state: handle " << handle << " is at step " << step
        << " but export was given an opt_state with count " << count
        << "; export the opt_state returned by the latest update.";
    return msg.str();
  }
  *slot = found;
  *step_out = step;
  return "";
}

std::string Registry::CheckRead(const Request& request, int64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<Slot> unused;
  int64_t step = 0;
  return FindForReadLocked(request, count, &unused, &step);
}

std::string Registry::AcquireForRead(const Request& request, int64_t count,
                                     std::shared_ptr<Slot>* slot, int64_t* step_out) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = FindForReadLocked(request, count, slot, step_out);
  if (error.empty() && *slot) TouchLocked(**slot);
  return error;
}

std::string Registry::AcquireForImport(const Request& request, Allocator& allocator,
                                       std::shared_ptr<Slot>* slot, int32_t* handle_out) {
  std::lock_guard<std::mutex> lock(mu_);
  return CreateSlotLocked(request, allocator, slot, handle_out);
}

std::string Registry::SlotsOf(int32_t handle, std::vector<std::shared_ptr<Slot>>* slots,
                              bool touch) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = CheckHandleLocked(handle);
  if (!error.empty()) return error;
  for (auto& [key, slot] : slots_) {
    if (std::get<0>(key) != handle) continue;
    if (touch) TouchLocked(*slot);
    slots->push_back(slot);
  }
  return "";
}

size_t Registry::TotalBytes() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t total = 0;
  for (auto& [key, slot] : slots_) total += slot->bytes();
  return total;
}

std::string DescribeLayoutMismatch(const std::vector<LeafSpec>& expected,
                                   const std::vector<LeafSpec>& got) {
  Message msg;
  if (expected.size() != got.size()) {
    msg << "the stored state has " << expected.size() << " leaves, the call has " << got.size();
    return msg.str();
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] == got[i]) continue;
    auto describe = [](const LeafSpec& s) {
      Message d;
      d << s.size << " elements, " << (s.is_8bit ? "8-bit" : "float32") << " state, "
        << s.num_scales << " scales";
      return d.str();
    };
    msg << "leaf " << i << " is stored as (" << describe(expected[i]) << ") but the call has ("
        << describe(got[i]) << ")";
    return msg.str();
  }
  return "";
}

}  // namespace optax_paged8bit
