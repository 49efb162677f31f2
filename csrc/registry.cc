#include "registry.h"

#include <algorithm>
#include <set>

namespace optax_paged8bit {

const char* PlatformName(Platform platform) { return platform == Platform::kCuda ? "cuda" : "cpu"; }

Slot::~Slot() {
  for (Memory& m : memory) {
    if (m.data != nullptr && m.free_fn != nullptr) m.free_fn(m.data);
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

int32_t Registry::NewHandle() {
  std::lock_guard<std::mutex> lock(mu_);
  int32_t handle = next_handle_++;
  fate_.resize(handle + 1, Fate::kLive);
  unheld_since_.resize(handle + 1, 0);
  return handle;
}

bool Registry::IsReleased(int32_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  return handle > 0 && handle < next_handle_ && fate_[handle] == Fate::kReleased;
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
    if (handle <= 0 || handle >= next_handle_) return 0;
    fate_[handle] = Fate::kReleased;
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

size_t Registry::Collect(const std::vector<int32_t>& held, uint64_t mark) {
  std::set<int32_t> held_set(held.begin(), held.end());
  std::vector<std::shared_ptr<Slot>> doomed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The latest use of each handle's slots.
    std::map<int32_t, uint64_t> last_use;
    for (auto& [key, slot] : slots_) {
      uint64_t& latest = last_use[std::get<0>(key)];
      latest = std::max(latest, slot->last_use);
    }
    std::set<int32_t> freeing;
    for (auto [handle, latest] : last_use) {
      uint64_t& since = unheld_since_[handle];
      if (held_set.count(handle) != 0) {
        since = 0;
      } else if (since != 0 && since < mark && latest < since) {
        freeing.insert(handle);  // unheld at two scans and not used in between
      } else if (latest < mark) {
        since = mark;  // unheld for the first time (or used since the last scan)
      }
    }
    for (int32_t handle : freeing) {
      fate_[handle] = Fate::kCollected;
      unheld_since_[handle] = 0;
    }
    doomed = TakeSlotsLocked([&freeing](int32_t h) { return freeing.count(h) != 0; });
  }
  return BytesOnceUnused(doomed);
}

std::string Registry::CheckHandleLocked(int32_t handle) const {
  Message msg;
  if (handle <= 0 || handle >= next_handle_) {
    msg << "optimizer state handle " << handle
        << " was not created in this process (a state saved elsewhere, or built by hand). "
           "Create the state with tx.init(params) in this process and load saved values with "
           "optax_paged8bit.import_state.";
    return msg.str();
  }
  if (fate_[handle] == Fate::kReleased) {
    msg << "optimizer state handle " << handle
        << " was released (optax_paged8bit.release was called on it, or on a state that shares "
           "its handle); create a new state with tx.init(params).";
    return msg.str();
  }
  return "";
}

std::string Registry::MissingSlotLocked(int32_t handle, Platform platform, int device,
                                        int64_t count, const char* hint) const {
  Message msg;
  msg << "optimizer state handle " << handle << " has no stored state on " << PlatformName(platform)
      << ":" << device << " but its count is " << count;
  if (fate_[handle] == Fate::kCollected) {
    msg << ". Its memory was freed by optax_paged8bit's collector because no live jax.Array "
           "held the handle: the state was dropped, or kept only as a host copy "
           "(jax.device_get, pickle). Keep the opt_state as jax arrays while it is in use, and "
           "save it with optax_paged8bit.export_state.";
  } else {
    msg << "; " << hint;
  }
  return msg.str();
}

std::string Registry::CreateSlotLocked(const Key& key, Platform platform, int device,
                                       const std::vector<LeafSpec>& layout, Allocator& allocator,
                                       std::shared_ptr<Slot>* out) {
  auto slot = std::make_shared<Slot>();
  slot->platform = platform;
  slot->device = device;
  slot->layout = layout;
  slot->leaves.resize(layout.size());
  // One allocation (arena) per slot: one prefetch or advice call moves it all.
  constexpr size_t kAlign = 256;
  auto round_up = [](size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
  size_t total = 0;
  for (const LeafSpec& spec : layout) {
    total += 2 * round_up(spec.state_bytes()) + 2 * round_up(spec.scale_bytes());
  }
  std::string error;
  char* arena = nullptr;
  if (total > 0) {
    Memory m = allocator.Allocate(total, &error);
    if (m.data == nullptr) {
      Message msg;
      msg << "could not allocate optimizer state for handle " << std::get<0>(key) << " on "
          << PlatformName(platform) << ":" << device << ": " << error;
      return msg.str();
    }
    slot->memory.push_back(m);
    arena = static_cast<char*>(m.data);
  }
  auto carve = [&](size_t bytes) -> void* {
    if (bytes == 0) return nullptr;
    void* p = arena;
    arena += round_up(bytes);
    return p;
  };
  for (size_t i = 0; i < layout.size(); ++i) {
    LeafState& leaf = slot->leaves[i];
    leaf.state1 = carve(layout[i].state_bytes());
    leaf.state2 = carve(layout[i].state_bytes());
    leaf.absmax1 = static_cast<float*>(carve(layout[i].scale_bytes()));
    leaf.absmax2 = static_cast<float*>(carve(layout[i].scale_bytes()));
  }
  fate_[std::get<0>(key)] = Fate::kLive;  // a collected handle used at count 0 starts afresh
  unheld_since_[std::get<0>(key)] = 0;
  TouchLocked(*slot);
  slots_[key] = slot;
  *out = std::move(slot);
  return "";
}

std::string Registry::FindForUpdateLocked(int32_t handle, Platform platform, int device,
                                          int64_t count, const std::vector<LeafSpec>& layout,
                                          std::shared_ptr<Slot>* slot) {
  std::string error = CheckHandleLocked(handle);
  if (!error.empty()) return error;
  auto it = slots_.find(Key{handle, static_cast<int>(platform), device});
  Message msg;
  if (it == slots_.end()) {
    if (count != 0) {
      return MissingSlotLocked(handle, platform, device, count,
                               "a restored opt_state must be loaded with "
                               "optax_paged8bit.import_state before the first update.");
    }
    slot->reset();  // a fresh state: the caller may create its slot
    return "";
  }
  const std::shared_ptr<Slot>& found = it->second;
  std::string mismatch = DescribeLayoutMismatch(found->layout, layout);
  if (!mismatch.empty()) {
    msg << "optimizer state handle " << handle << " belongs to an optimizer over different "
        << "parameters: " << mismatch
        << ". Use the opt_state that this optimizer's init returned for these params.";
    return msg.str();
  }
  if (found->step != count) {
    msg << "stale optimizer state: handle " << handle << " on " << PlatformName(platform) << ":"
        << device << " is at step " << found->step << " but the update got an opt_state with "
        << "count " << count << ". paged_adamw8bit advances its state in place, so each "
        << "opt_state can be updated once. This happens when an older opt_state is reused "
        << "(re-running or rolling back a step), when optax.MultiSteps or another wrapper "
        << "runs the update and discards its result, or when a jitted init handed the same "
        << "handle to two states. Always pass the opt_state returned by the previous update; "
        << "accumulate gradients with optax_paged8bit.accumulate_gradients.";
    return msg.str();
  }
  *slot = found;
  return "";
}

std::string Registry::CheckUpdate(int32_t handle, Platform platform, int device, int64_t count,
                                  const std::vector<LeafSpec>& layout) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<Slot> unused;
  return FindForUpdateLocked(handle, platform, device, count, layout, &unused);
}

std::string Registry::AcquireForUpdate(int32_t handle, Platform platform, int device, int64_t count,
                                       const std::vector<LeafSpec>& layout, Allocator& allocator,
                                       std::shared_ptr<Slot>* slot) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = FindForUpdateLocked(handle, platform, device, count, layout, slot);
  if (!error.empty()) return error;
  if (*slot) {
    TouchLocked(**slot);
    return "";
  }
  return CreateSlotLocked(Key{handle, static_cast<int>(platform), device}, platform, device, layout,
                          allocator, slot);
}

std::string Registry::AcquireForRead(int32_t handle, Platform platform, int device, int64_t count,
                                     const std::vector<LeafSpec>& layout,
                                     std::shared_ptr<Slot>* slot) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = CheckHandleLocked(handle);
  if (!error.empty()) return error;
  auto it = slots_.find(Key{handle, static_cast<int>(platform), device});
  Message msg;
  if (it == slots_.end()) {
    if (count == 0) {
      slot->reset();
      return "";
    }
    return MissingSlotLocked(handle, platform, device, count,
                             "a restored opt_state must be loaded with "
                             "optax_paged8bit.import_state before it is exported.");
  }
  std::string mismatch = DescribeLayoutMismatch(it->second->layout, layout);
  if (!mismatch.empty()) {
    msg << "optimizer state handle " << handle
        << " does not match the requested layout: " << mismatch << ".";
    return msg.str();
  }
  if (it->second->step != count) {
    msg << "stale optimizer state: handle " << handle << " is at step " << it->second->step
        << " but export was given an opt_state with count " << count
        << "; export the opt_state returned by the latest update.";
    return msg.str();
  }
  TouchLocked(*it->second);
  *slot = it->second;
  return "";
}

std::string Registry::AcquireForImport(int32_t handle, Platform platform, int device,
                                       const std::vector<LeafSpec>& layout, Allocator& allocator,
                                       std::shared_ptr<Slot>* slot) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = CheckHandleLocked(handle);
  if (!error.empty()) return error;
  Key key{handle, static_cast<int>(platform), device};
  auto it = slots_.find(key);
  if (it != slots_.end() && it->second->layout == layout) {
    TouchLocked(*it->second);
    *slot = it->second;
    return "";
  }
  if (it != slots_.end()) slots_.erase(it);
  return CreateSlotLocked(key, platform, device, layout, allocator, slot);
}

std::string Registry::SlotsOf(int32_t handle, std::vector<std::shared_ptr<Slot>>* slots) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string error = CheckHandleLocked(handle);
  if (!error.empty()) return error;
  for (auto& [key, slot] : slots_) {
    if (std::get<0>(key) != handle) continue;
    TouchLocked(*slot);
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
