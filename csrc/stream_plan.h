// The plan of a streamed step (cuda_ops.cc, "streaming state that lies in host
// RAM"): which pieces of which leaves each chunk of the device window holds,
// the copies that move their moments in and out, and the launch table that
// updates them there. Host code only, so that tests check it on the CPU
// (tests/native/stream_plan_check.cc).
#ifndef OPTAX_PAGED8BIT_STREAM_PLAN_H_
#define OPTAX_PAGED8BIT_STREAM_PLAN_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "adam8bit.h"
#include "cuda_kernels.h"
#include "ffi_common.h"
#include "registry.h"

namespace optax_paged8bit {

// kLeafAligned when grad, param and out start on 16 bytes and an 8-bit leaf's
// codes (read and written) on 8: then every lane of 8 elements (which starts
// 16 or 32 bytes after the previous one) loads and stores in 16- and 8-byte
// words, and the update kernel checks no address per block.
inline int32_t AlignmentFlag(const LeafDesc& d) {
  auto aligned = [](const void* p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
  };
  bool words = aligned(d.grad, 16) && aligned(d.param, 16) && aligned(d.out, 16);
  bool codes = !(d.flags & kLeaf8bit) || (aligned(d.state1, 8) && aligned(d.state2, 8) &&
                                          aligned(d.state1_in, 8) && aligned(d.state2_in, 8));
  return words && codes ? kLeafAligned : 0;
}

// The window's buffers: `buffers` of `chunk_bytes` from `base`; the next
// chunk takes buffer `next`.
struct WindowShape {
  char* base = nullptr;
  size_t chunk_bytes = 0;
  int buffers = 0;
  int next = 0;
};

// Appends a copy, merged with the previous one where both sides continue it
// (whole leaves lie in the window as in the arena: one copy moves a run).
inline void AddCopy(std::vector<CopyRange>* copies, void* to, const void* from, size_t bytes) {
  if (bytes == 0) return;
  auto* t = static_cast<char*>(to);
  auto* f = static_cast<const char*>(from);
  if (!copies->empty()) {
    CopyRange& last = copies->back();
    if (last.to + last.bytes == t && last.from + last.bytes == f) {
      last.bytes += bytes;
      return;
    }
  }
  copies->push_back({t, f, bytes});
}

// A chunk: the pieces of leaves (runs of whole blocks) one window buffer
// holds, the launch table that updates them there, and the copies in and out.
struct StreamChunk {
  int buffer = 0;
  size_t used = 0;  // bytes of the buffer
  std::unique_ptr<LeafTable> table;
  std::vector<CopyRange> in, out;
  size_t bytes_in = 0;
};

inline size_t ParamBytes(int32_t type) { return type == kF32 ? 4 : 2; }

// Splits the leaves with streamed[i] set (grouped by dtype, as the update
// kernels take them) into chunks of at most the window's chunk bytes, which
// take its buffers in turn from w.next.
inline std::vector<StreamChunk> PlanChunks(const std::vector<LeafCall>& calls,
                                           const std::vector<LeafSpec>& layout,
                                           const std::vector<StepState>& states,
                                           const std::vector<bool>& streamed,
                                           const WindowShape& w) {
  std::vector<size_t> order;
  for (size_t i = 0; i < calls.size(); ++i) {
    if (streamed[i]) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return calls[a].type < calls[b].type; });
  std::vector<StreamChunk> chunks;
  auto open_chunk = [&]() {
    StreamChunk c;
    c.buffer = static_cast<int>((w.next + chunks.size()) % w.buffers);
    c.table = std::make_unique<LeafTable>();
    c.table->num_leaves = 0;
    c.table->num_blocks = 0;
    chunks.push_back(std::move(c));
  };
  // A piece's four arrays each start on kArenaAlign bytes in the buffer.
  constexpr size_t kPieceSlack = 4 * kArenaAlign;
  auto blocks_that_fit = [&](size_t room, size_t per_block) -> int64_t {
    return room > kPieceSlack ? static_cast<int64_t>((room - kPieceSlack) / per_block) : 0;
  };
  for (size_t i : order) {
    const LeafCall& call = calls[i];
    const LeafSpec& spec = layout[i];
    const StepState& st = states[i];
    size_t value_bytes = spec.is_8bit ? 1 : 4;  // of one moment's element
    size_t per_block = 2 * kBlockSize * value_bytes + (spec.is_8bit ? 2 * sizeof(float) : 0);
    int64_t blocks = (call.size + kBlockSize - 1) / kBlockSize;
    for (int64_t b = 0; b < blocks;) {
      if (chunks.empty() || chunks.back().table->num_leaves == kMaxLeavesPerLaunch ||
          chunks.back().table->leaves[0].type != call.type) {
        open_chunk();
      }
      int64_t n = blocks_that_fit(w.chunk_bytes - chunks.back().used, per_block);
      if (n == 0) {
        open_chunk();
        n = blocks_that_fit(w.chunk_bytes, per_block);
      }
      n = std::min(n, blocks - b);
      StreamChunk& c = chunks.back();
      int64_t e0 = b * kBlockSize;
      int64_t e1 = std::min(call.size, (b + n) * kBlockSize);
      bool whole = b == 0 && e1 == call.size;
      size_t values = static_cast<size_t>(e1 - e0) * value_bytes;
      size_t scales = spec.is_8bit ? static_cast<size_t>(n) * sizeof(float) : 0;
      // A whole leaf's arrays are copied with their arena padding, so that
      // runs of whole leaves merge into one copy.
      size_t values_copied = whole ? ArenaRound(values) : values;
      size_t scales_copied = whole ? ArenaRound(scales) : scales;
      char* s1 = w.base + c.buffer * w.chunk_bytes + c.used;
      char* s2 = s1 + ArenaRound(values);
      char* a1 = s2 + ArenaRound(values);
      char* a2 = a1 + ArenaRound(scales);
      c.used += 2 * ArenaRound(values) + 2 * ArenaRound(scales);
      size_t at = static_cast<size_t>(e0) * value_bytes;
      AddCopy(&c.in, s1, static_cast<const char*>(st.in.state1) + at, values_copied);
      AddCopy(&c.in, s2, static_cast<const char*>(st.in.state2) + at, values_copied);
      if (scales > 0) {
        AddCopy(&c.in, a1, st.in.absmax1 + b, scales_copied);
        AddCopy(&c.in, a2, st.in.absmax2 + b, scales_copied);
      }
      AddCopy(&c.out, static_cast<char*>(st.out.state1) + at, s1, values_copied);
      AddCopy(&c.out, static_cast<char*>(st.out.state2) + at, s2, values_copied);
      if (scales > 0) {
        AddCopy(&c.out, st.out.absmax1 + b, a1, scales_copied);
        AddCopy(&c.out, st.out.absmax2 + b, a2, scales_copied);
      }
      c.bytes_in += 2 * (values_copied + scales_copied);
      LeafTable& table = *c.table;
      LeafDesc& d = table.leaves[table.num_leaves++];
      size_t param_at = static_cast<size_t>(e0) * ParamBytes(call.type);
      d.grad = static_cast<const char*>(call.grad) + param_at;
      d.param = static_cast<const char*>(call.param) + param_at;
      d.out = static_cast<char*>(call.out) + param_at;
      d.state1 = s1;
      d.state2 = s2;
      d.absmax1 = scales > 0 ? reinterpret_cast<float*>(a1) : nullptr;
      d.absmax2 = scales > 0 ? reinterpret_cast<float*>(a2) : nullptr;
      d.state1_in = d.state1;
      d.state2_in = d.state2;
      d.absmax1_in = d.absmax1;
      d.absmax2_in = d.absmax2;
      d.size = e1 - e0;
      d.block_begin = table.num_blocks;
      d.type = call.type;
      d.flags = call.flags;
      d.flags |= AlignmentFlag(d);
      d.index = static_cast<int32_t>(i);
      table.num_blocks += n;
      b += n;
    }
  }
  return chunks;
}

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_STREAM_PLAN_H_
