// Checks the plan of a streamed step (stream_plan.h: PlanChunks) on the CPU:
// an arena laid out as a slot's, params of three dtypes, a window in host
// memory. The plan's copies in run with memcpy; then a stand-in for the
// update kernel checks each piece of each launch table (its params, grads and
// outputs start where its moments start in the leaf, its moments arrived in
// the window whole, its blocks are counted in the table) and writes values
// that name each element and block; the copies out run; every element and
// scale of every streamed leaf must hold its value once, and nothing else of
// the arena (other leaves, or a stage's other buffer) may change.
//   stream_plan_check CHUNK_BYTES BUFFERS FIRST_BUFFER STAGED
//   -> prints "pieces P chunks C copies_in I copies_out O max_used U bad B"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "stream_plan.h"

using namespace optax_paged8bit;

namespace {

int bad = 0;
void Check(bool ok, const char* what, size_t leaf, int64_t at) {
  if (!ok && bad++ < 20) std::printf("MISMATCH %s leaf %zu at %lld\n", what, leaf, (long long)at);
}

// What the stand-in kernel writes: a value that names the leaf and element.
uint8_t Code(size_t leaf, int64_t i, int moment) {
  return static_cast<uint8_t>((leaf * 131 + i * 7 + moment * 29) & 0xff);
}
float Value(size_t leaf, int64_t i, int moment) {
  return static_cast<float>(leaf * 1000003 + i * 2 + moment);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s CHUNK_BYTES BUFFERS FIRST_BUFFER STAGED\n", argv[0]);
    return 2;
  }
  WindowShape w;
  w.chunk_bytes = std::strtoull(argv[1], nullptr, 10);
  w.buffers = std::atoi(argv[2]);
  w.next = std::atoi(argv[3]);
  bool staged = std::atoi(argv[4]) != 0;

  // Leaves: partial and whole blocks, float32 moments, empty and tiny leaves,
  // leaves larger than a chunk, three dtypes interleaved, and more leaves of
  // one dtype than a launch table holds.
  struct Leaf {
    int64_t size;
    bool is_8bit;
    int32_t type;
  };
  std::vector<Leaf> leaves = {
      {300000, true, kF32}, {4097, true, kBF16},    {0, false, kF32},     {100, false, kF32},
      {256, true, kF16},    {1 << 20, true, kF32},  {3000, false, kBF16}, {257, true, kF32},
      {1, false, kF16},     {2500000, true, kBF16}, {65536, false, kF32}, {5000, true, kF16},
  };
  for (int i = 0; i < 300; ++i) leaves.push_back({4096 + 37 * i, true, kF32});
  size_t n = leaves.size();
  std::vector<LeafSpec> layout(n);
  std::vector<size_t> offsets(1, 0);
  for (size_t i = 0; i < n; ++i) {
    int64_t scales = leaves[i].is_8bit ? (leaves[i].size + kBlockSize - 1) / kBlockSize : 0;
    layout[i] = LeafSpec{leaves[i].size, leaves[i].is_8bit, scales};
    offsets.push_back(offsets.back() + LeafArenaBytes(layout[i]));
  }
  std::mt19937 rng(7);
  auto random_bytes = [&](std::vector<uint8_t>* v) {
    for (auto& b : *v) b = static_cast<uint8_t>(rng());
  };
  std::vector<uint8_t> arena(offsets.back()), stage(offsets.back());
  random_bytes(&arena);
  random_bytes(&stage);
  const std::vector<uint8_t> arena0 = arena, stage0 = stage;
  auto carve = [&](std::vector<uint8_t>& base, size_t i) {
    LeafState s;
    char* at = reinterpret_cast<char*>(base.data()) + offsets[i];
    size_t values = layout[i].state_bytes(), scales = layout[i].scale_bytes();
    s.state1 = values ? at : nullptr;
    s.state2 = values ? at + ArenaRound(values) : nullptr;
    s.absmax1 = scales ? reinterpret_cast<float*>(at + 2 * ArenaRound(values)) : nullptr;
    s.absmax2 = scales ? reinterpret_cast<float*>(at + 2 * ArenaRound(values) + ArenaRound(scales))
                       : nullptr;
    return s;
  };
  std::vector<std::vector<uint8_t>> grads(n), params(n), outs(n);
  std::vector<LeafCall> calls(n);
  std::vector<StepState> states(n);
  std::vector<bool> streamed(n);
  for (size_t i = 0; i < n; ++i) {
    size_t bytes = static_cast<size_t>(leaves[i].size) * ParamBytes(leaves[i].type);
    grads[i].resize(bytes + 16);
    params[i].resize(bytes + 16);
    outs[i].resize(bytes + 16);
    calls[i] = LeafCall{leaves[i].type,  leaves[i].size,   leaves[i].is_8bit ? kLeaf8bit : 0,
                        grads[i].data(), params[i].data(), outs[i].data()};
    states[i] = StepState{carve(arena, i), carve(staged ? stage : arena, i)};
    streamed[i] = i != 3 && i != 7 && i % 5 != 4;  // some leaves stay where they are
  }
  std::vector<uint8_t> window(w.chunk_bytes * w.buffers);
  w.base = reinterpret_cast<char*>(window.data());
  std::vector<StreamChunk> chunks = PlanChunks(calls, layout, states, streamed, w);

  size_t pieces = 0, copies_in = 0, copies_out = 0, max_used = 0;
  std::vector<std::vector<int>> seen(n);
  for (size_t i = 0; i < n; ++i) seen[i].assign(leaves[i].size, 0);
  for (size_t k = 0; k < chunks.size(); ++k) {
    StreamChunk& c = chunks[k];
    Check(c.buffer == static_cast<int>((w.next + k) % w.buffers), "buffer", k, 0);
    Check(c.used <= w.chunk_bytes, "chunk bytes", k, c.used);
    max_used = std::max(max_used, c.used);
    char* buffer = w.base + c.buffer * w.chunk_bytes;
    for (const CopyRange& r : c.in) {
      Check(r.to >= buffer && r.to + r.bytes <= buffer + c.used, "copy in lands in its buffer", k,
            0);
      std::memcpy(r.to, r.from, r.bytes);
    }
    copies_in += c.in.size();
    const LeafTable& t = *c.table;
    int64_t blocks = 0;
    for (int p = 0; p < t.num_leaves; ++p, ++pieces) {
      const LeafDesc& d = t.leaves[p];
      size_t i = static_cast<size_t>(d.index);
      Check(i < n && streamed[i], "a streamed leaf", i, p);
      Check(d.type == t.leaves[0].type && d.type == leaves[i].type, "one dtype a table", i, p);
      size_t pb = ParamBytes(d.type);
      int64_t e0 = (static_cast<const uint8_t*>(d.param) - params[i].data()) / pb;
      Check(e0 % kBlockSize == 0 && e0 >= 0 && e0 + d.size <= leaves[i].size && d.size > 0,
            "piece on whole blocks", i, e0);
      Check(static_cast<const uint8_t*>(d.grad) == grads[i].data() + e0 * pb, "grad", i, e0);
      Check(static_cast<uint8_t*>(d.out) == outs[i].data() + e0 * pb, "out", i, e0);
      Check(d.block_begin == blocks, "block_begin", i, e0);
      int64_t nb = (d.size + kBlockSize - 1) / kBlockSize;
      blocks += nb;
      Check(d.state1_in == d.state1 && d.absmax1_in == d.absmax1, "in place", i, e0);
      Check((d.flags & kLeafAligned) != 0, "aligned", i, e0);
      auto in_buffer = [&](const void* q) {
        return static_cast<const char*>(q) >= buffer &&
               static_cast<const char*>(q) < buffer + c.used;
      };
      Check(in_buffer(d.state1) && in_buffer(d.state2), "moments in the buffer", i, e0);
      int64_t b0 = e0 / kBlockSize;
      for (int64_t j = 0; j < d.size; ++j) {
        int64_t e = e0 + j;
        seen[i][e] += 1;
        if (leaves[i].is_8bit) {
          auto* s1 = static_cast<uint8_t*>(d.state1);
          auto* s2 = static_cast<uint8_t*>(d.state2);
          Check(s1[j] == static_cast<const uint8_t*>(states[i].in.state1)[e], "codes in", i, e);
          Check(s2[j] == static_cast<const uint8_t*>(states[i].in.state2)[e], "codes in", i, e);
          s1[j] = Code(i, e, 1);
          s2[j] = Code(i, e, 2);
        } else {
          auto* s1 = static_cast<float*>(d.state1);
          auto* s2 = static_cast<float*>(d.state2);
          Check(std::memcmp(&s1[j], static_cast<const float*>(states[i].in.state1) + e, 4) == 0,
                "moment in", i, e);
          Check(std::memcmp(&s2[j], static_cast<const float*>(states[i].in.state2) + e, 4) == 0,
                "moment in", i, e);
          s1[j] = Value(i, e, 1);
          s2[j] = Value(i, e, 2);
        }
      }
      if (leaves[i].is_8bit) {
        Check(in_buffer(d.absmax1) && in_buffer(d.absmax2), "scales in the buffer", i, e0);
        for (int64_t j = 0; j < nb; ++j) {
          Check(std::memcmp(&d.absmax1[j], states[i].in.absmax1 + b0 + j, 4) == 0, "scale in", i,
                b0 + j);
          Check(std::memcmp(&d.absmax2[j], states[i].in.absmax2 + b0 + j, 4) == 0, "scale in", i,
                b0 + j);
          d.absmax1[j] = Value(i, b0 + j, 3);
          d.absmax2[j] = Value(i, b0 + j, 4);
        }
      } else {
        Check(d.absmax1 == nullptr && d.absmax2 == nullptr, "no scales", i, e0);
      }
    }
    Check(blocks == t.num_blocks, "num_blocks", k, blocks);
    for (const CopyRange& r : c.out) {
      Check(r.from >= buffer && r.from + r.bytes <= buffer + c.used, "copy out from its buffer", k,
            0);
      std::memcpy(r.to, r.from, r.bytes);
    }
    copies_out += c.out.size();
  }
  // Every element of every streamed leaf once; the others untouched.
  std::vector<uint8_t>& written = staged ? stage : arena;
  const std::vector<uint8_t>& written0 = staged ? stage0 : arena0;
  for (size_t i = 0; i < n; ++i) {
    LeafState out = carve(written, i);
    for (int64_t e = 0; e < leaves[i].size; ++e) {
      Check(seen[i][e] == (streamed[i] ? 1 : 0), "element covered once", i, e);
      if (!streamed[i]) continue;
      if (leaves[i].is_8bit) {
        Check(static_cast<uint8_t*>(out.state1)[e] == Code(i, e, 1), "codes out", i, e);
        Check(static_cast<uint8_t*>(out.state2)[e] == Code(i, e, 2), "codes out", i, e);
      } else {
        Check(static_cast<float*>(out.state1)[e] == Value(i, e, 1), "moment out", i, e);
        Check(static_cast<float*>(out.state2)[e] == Value(i, e, 2), "moment out", i, e);
      }
    }
    for (int64_t b = 0; b < layout[i].num_scales && streamed[i]; ++b) {
      Check(out.absmax1[b] == Value(i, b, 3) && out.absmax2[b] == Value(i, b, 4), "scales out", i,
            b);
    }
    if (!streamed[i]) {
      Check(std::memcmp(written.data() + offsets[i], written0.data() + offsets[i],
                        offsets[i + 1] - offsets[i]) == 0,
            "a leaf not streamed is untouched", i, 0);
    }
  }
  if (staged) Check(arena == arena0, "a stage leaves the slot's arena as it was", 0, 0);
  std::printf("pieces %zu chunks %zu copies_in %zu copies_out %zu max_used %zu bad %d\n", pieces,
              chunks.size(), copies_in, copies_out, max_used, bad);
  return 0;
}
