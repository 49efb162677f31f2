// Decoding and checking of the custom calls' operands, shared by the CPU and
// CUDA handlers (host code only).
//
// update:  args   handle u32[], count s32[], structure s32[5 or 0],
//                 hyper f32[5], qmaps f32[2,256], rings f32[L or 0, 100],
//                 norms u32[B, 2] (or [0, 2]), grads x L, params x L
//          rets   handle u32[], count s32[], rings, out x L (updates, or new
//                 params when write_params)
//          attrs  leaf_flags i32[L], block_wise, percentile, write_params,
//                 optim_bits, min_8bit_size, norm_blocks i64[L or 0],
//                 layout_key, first_leaf, chunk_starts i64[K],
//                 layout_flags i32[N or 0], layout_sizes i64[N or 0]
//          A step of a state's N leaves is K calls of L leaves each
//          (StepChunk below), leaves chunk_starts[k].. in call k; K = 1 (the
//          usual step: chunk_starts [0], the layout is the call's leaves)
//          or more, chained by handle and count. Every call but the last is
//          a stage: it reads the slot and writes its leaves' new moments to
//          one more result, u8[arena bytes of its leaves], instead of the
//          slot, and returns the count unchanged. The last call commits: it
//          takes the stages' results as K - 1 more operands, steps its own
//          leaves in the slot, copies the staged moments in and advances the
//          count. So the slot changes only in the last call, after every
//          check: a step cut short (a failing call or operation between
//          them, a dropped result) leaves the state as it was.
// update_arrays (adamw8bit: the state as arrays, no registry):
//          args   count, structure, hyper, qmaps, rings, norms, grads x L,
//                 params x L, the state arrays (below)
//          rets   count, rings, out x L, the new state arrays
//          attrs  as update, but layout_key
// export:  args   handle, count
//          rets   count (the step the moments are at), codes u8[], floats f32[]
// import:  args   count, codes u8[], floats f32[]
//          rets   handle (a new one), count
//          attrs (both) leaf_flags, block_wise, layout_key, leaf_sizes i64[L]
//          (export and import carry the state arrays packed in two flat
//          buffers, FlatState below: two results or operands whatever the
//          number of leaves, which keeps XLA's compile time flat)
// block_norms: args grads x L
//          rets   norms u32[B, 2]: the float64 squared norm of each 256-element
//                 block of each leaf, leaf by leaf (SPEC 3.5's first stage)
//
// `norms` and `norm_blocks` carry percentile clipping's block norms of
// sharded params: each device's block_norms, gathered over the mesh in the
// leaves' global block order (leaf i has norm_blocks[i] of them), so that
// every device reduces a leaf's whole norm in the defined order. Empty: the
// call computes them from its own grads (one device).
//
// The state arrays, leaf by leaf: state1, state2, absmax1, absmax2 of an
// 8-bit leaf; state1, state2 (float32 moments) of another.
//
// `structure` carries the layout-fixing arguments of a call whose Python
// values were traced (optax.inject_hyperparams without static_args): the
// optim_bits keyword, the effective optim_bits, min_8bit_size,
// percentile_clipping and block_wise. They must equal what the layout was
// built with at init (the attributes); empty when they were concrete (the
// Python side checked them).
#ifndef OPTAX_PAGED8BIT_FFI_COMMON_H_
#define OPTAX_PAGED8BIT_FFI_COMMON_H_

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "adam8bit.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace optax_paged8bit {

namespace ffi = xla::ffi;

constexpr const char* kUpdateTarget = "optax_paged8bit_update";
constexpr const char* kExportTarget = "optax_paged8bit_export";
constexpr const char* kImportTarget = "optax_paged8bit_import";
constexpr const char* kUpdateArraysTarget = "optax_paged8bit_update_arrays";
constexpr const char* kBlockNormsTarget = "optax_paged8bit_block_norms";

// One leaf of an update call.
struct LeafCall {
  int32_t type = kF32;
  int64_t size = 0;
  int32_t flags = 0;
  const void* grad = nullptr;
  const void* param = nullptr;
  void* out = nullptr;
};

// One leaf of an export or import call: the four state arrays.
struct LeafArrays {
  int64_t size = 0;
  int64_t num_scales = 0;
  bool is_8bit = false;
  void* state1 = nullptr;
  void* state2 = nullptr;
  void* absmax1 = nullptr;
  void* absmax2 = nullptr;
};

inline int64_t NumScales(int64_t size, bool is_8bit, bool block_wise) {
  if (!is_8bit) return 0;
  return block_wise ? (size + kBlockSize - 1) / kBlockSize : 1;
}

inline bool ToElemType(ffi::DataType dtype, int32_t* type) {
  switch (dtype) {
    case ffi::DataType::F32:
      *type = kF32;
      return true;
    case ffi::DataType::BF16:
      *type = kBF16;
      return true;
    case ffi::DataType::F16:
      *type = kF16;
      return true;
    default:
      return false;
  }
}

inline ffi::Error InvalidArgument(const std::string& op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

// The state's handle travels as a uint32 scalar (a fresh token or a live
// handle, registry.h), so that the collector can tell it from int32 step
// counts among the live arrays.
using HandleBuffer = ffi::Buffer<ffi::U32>;
using HandleResult = ffi::Result<ffi::Buffer<ffi::U32>>;

inline ffi::Error CheckScalarOperands(const char* op, const HandleBuffer& handle,
                                      const ffi::Buffer<ffi::S32>& count) {
  if (handle.element_count() != 1 || count.element_count() != 1) {
    return InvalidArgument(op, "handle must be a uint32 scalar and count an int32 scalar");
  }
  return ffi::Error::Success();
}

// The attributes that fix a state's layout at init.
struct StructureAttrs {
  int32_t optim_bits = 8;  // effective: 8 (codes) or 32 (float32 moments everywhere)
  int64_t min_8bit_size = 0;
  int32_t percentile = 100;
  bool block_wise = true;
};

constexpr size_t kStructureValues = 5;

// Checks the traced layout-fixing arguments (`values`, the structure operand
// read on the host) against the layout's.
inline ffi::Error CheckStructure(const char* op, const int32_t* values, size_t n,
                                 const StructureAttrs& attrs) {
  if (n == 0) return ffi::Error::Success();
  if (n != kStructureValues) {
    return InvalidArgument(op, "structure must be int32[5] or empty");
  }
  struct Field {
    const char* name;
    int64_t got, want;
  };
  const Field fields[] = {{"optim_bits", values[0], 32},
                          {"optim_bits (through args)", values[1], attrs.optim_bits},
                          {"min_8bit_size", values[2], attrs.min_8bit_size},
                          {"percentile_clipping", values[3], attrs.percentile},
                          {"block_wise", values[4], attrs.block_wise ? 1 : 0}};
  for (const Field& f : fields) {
    if (f.got == f.want) continue;
    Message msg;
    if (&f == &fields[0]) {
      msg << "optim_bits must be 32, got " << f.got
          << " (the keyword exists for bitsandbytes' signature; float32 moments on every leaf "
             "are args={'optim_bits': 32})";
      return InvalidArgument(op, msg.str());
    }
    msg << f.name << " is " << f.got << " in this update but the opt_state was built with "
        << f.want
        << " at init. It fixes which leaves keep 8-bit codes and how, so it cannot change "
           "after init: build a new state with tx.init (or import the old one into it), and "
           "under optax.inject_hyperparams pass it in static_args.";
    return InvalidArgument(op, msg.str());
  }
  return ffi::Error::Success();
}

// Decodes the variadic grads/params/outputs of an update; the arrays-state
// variant has 4 state arrays per leaf after them, as operands and results.
// `extra_args` and `extra_rets` follow them: the state arrays, or a chunked
// step's staged moments (StepChunk).
inline ffi::Error DecodeUpdateLeaves(const char* op, ffi::RemainingArgs args,
                                     ffi::RemainingRets rets, ffi::Span<const int32_t> flags,
                                     bool block_wise, size_t extra_args, size_t extra_rets,
                                     std::vector<LeafCall>* leaves, std::vector<LeafSpec>* layout) {
  size_t num_leaves = flags.size();
  if (args.size() != 2 * num_leaves + extra_args || rets.size() != num_leaves + extra_rets) {
    Message msg;
    msg << "expected " << num_leaves << " grads, " << num_leaves << " params and " << num_leaves
        << " outputs (one per leaf flag), plus " << extra_args << " operands and " << extra_rets
        << " results after them, got " << args.size() << " operands and " << rets.size()
        << " results";
    return InvalidArgument(op, msg.str());
  }
  leaves->resize(num_leaves);
  layout->resize(num_leaves);
  for (size_t i = 0; i < num_leaves; ++i) {
    auto grad = args.get<ffi::AnyBuffer>(i);
    auto param = args.get<ffi::AnyBuffer>(num_leaves + i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!grad.has_value() || !param.has_value() || !out.has_value()) {
      return InvalidArgument(op, "leaf " + std::to_string(i) + " is not a buffer");
    }
    LeafCall& leaf = (*leaves)[i];
    if (!ToElemType(param->element_type(), &leaf.type)) {
      return InvalidArgument(
          op, "leaf " + std::to_string(i) + ": param dtype must be float32, bfloat16 or float16");
    }
    if (grad->element_type() != param->element_type() ||
        (*out)->element_type() != param->element_type()) {
      return InvalidArgument(
          op, "leaf " + std::to_string(i) + ": grad, param and output dtypes differ");
    }
    leaf.size = static_cast<int64_t>(param->element_count());
    if (static_cast<int64_t>(grad->element_count()) != leaf.size ||
        static_cast<int64_t>((*out)->element_count()) != leaf.size) {
      Message msg;
      msg << "leaf " << i << ": grad has " << grad->element_count() << " elements, param has "
          << leaf.size << ", output has " << (*out)->element_count();
      return InvalidArgument(op, msg.str());
    }
    leaf.flags = flags[i];
    leaf.grad = grad->untyped_data();
    leaf.param = param->untyped_data();
    leaf.out = (*out)->untyped_data();
    bool is_8bit = (leaf.flags & kLeaf8bit) != 0;
    (*layout)[i] = LeafSpec{leaf.size, is_8bit, NumScales(leaf.size, is_8bit, block_wise)};
  }
  return ffi::Error::Success();
}

// Decodes 4 x L state arrays (export results, import operands, or the state
// of an arrays-state update): `available` buffers, the i-th from get(i).
// The state arrays of the leaves, in order: 4 for an 8-bit leaf (state1,
// state2, absmax1, absmax2), 2 for a leaf with float32 moments (it has no
// scales, and zero-size arrays only cost XLA's compiler time).
inline size_t NumStateArrays(ffi::Span<const int32_t> flags) {
  size_t n = 0;
  for (int32_t f : flags) n += (f & kLeaf8bit) ? 4 : 2;
  return n;
}

// Decodes the state arrays of every leaf (export results, import operands, or
// the state of an arrays-state update): `available` buffers, the i-th from
// get(i).
template <typename Getter>
ffi::Error DecodeStateArrays(const char* op, size_t available, Getter get,
                             ffi::Span<const int32_t> flags, bool block_wise,
                             std::vector<LeafArrays>* leaves, std::vector<LeafSpec>* layout) {
  size_t num_leaves = flags.size();
  if (available != NumStateArrays(flags)) {
    Message msg;
    msg << "expected " << NumStateArrays(flags) << " state arrays (4 per 8-bit leaf, 2 per leaf "
        << "with float32 moments) for " << num_leaves << " leaves, got " << available;
    return InvalidArgument(op, msg.str());
  }
  leaves->resize(num_leaves);
  layout->resize(num_leaves);
  size_t next = 0;
  for (size_t i = 0; i < num_leaves; ++i) {
    LeafArrays& leaf = (*leaves)[i];
    leaf.is_8bit = (flags[i] & kLeaf8bit) != 0;
    int count = leaf.is_8bit ? 4 : 2;
    ffi::AnyBuffer buffers[4] = {get(next), get(next + 1), get(next), get(next)};
    if (leaf.is_8bit) {
      buffers[2] = get(next + 2);
      buffers[3] = get(next + 3);
    }
    next += count;
    leaf.size = static_cast<int64_t>(buffers[0].element_count());
    leaf.num_scales = NumScales(leaf.size, leaf.is_8bit, block_wise);
    ffi::DataType state_type = leaf.is_8bit ? ffi::DataType::U8 : ffi::DataType::F32;
    Message msg;
    for (int k = 0; k < 2; ++k) {
      if (buffers[k].element_type() != state_type ||
          static_cast<int64_t>(buffers[k].element_count()) != leaf.size) {
        msg << "leaf " << i << ": state" << (k + 1) << " must be "
            << (leaf.is_8bit ? "uint8" : "float32") << " with " << leaf.size << " elements";
        return InvalidArgument(op, msg.str());
      }
    }
    for (int k = 2; k < count; ++k) {
      if (buffers[k].element_type() != ffi::DataType::F32 ||
          static_cast<int64_t>(buffers[k].element_count()) != leaf.num_scales) {
        msg << "leaf " << i << ": absmax" << (k - 1) << " must be float32 with " << leaf.num_scales
            << " elements, got " << buffers[k].element_count();
        return InvalidArgument(op, msg.str());
      }
    }
    leaf.state1 = buffers[0].untyped_data();
    leaf.state2 = buffers[1].untyped_data();
    leaf.absmax1 = leaf.is_8bit ? buffers[2].untyped_data() : nullptr;
    leaf.absmax2 = leaf.is_8bit ? buffers[3].untyped_data() : nullptr;
    (*layout)[i] = LeafSpec{leaf.size, leaf.is_8bit, leaf.num_scales};
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckUpdateAttrs(const char* op, const ffi::Buffer<ffi::F32>& hyper,
                                   const ffi::Buffer<ffi::F32>& qmaps,
                                   const ffi::Buffer<ffi::F32>& rings, size_t num_leaves,
                                   int32_t percentile) {
  if (hyper.element_count() != kNumHyperParams) {
    return InvalidArgument(op, "hyperparameters must be float32[5] (lr, beta1, beta2, eps, wd)");
  }
  if (qmaps.element_count() != 2 * kMapSize) {
    return InvalidArgument(op, "quantization maps must be float32[2, 256]");
  }
  bool clipping = percentile < 100;
  if (percentile < 1 || percentile > 100) {
    return InvalidArgument(op, "percentile must be in 1..100, got " + std::to_string(percentile));
  }
  size_t want = clipping ? num_leaves * kRingSize : 0;
  if (rings.element_count() != want) {
    Message msg;
    msg << "clipping rings must have " << want << " elements, got " << rings.element_count();
    return InvalidArgument(op, msg.str());
  }
  return ffi::Error::Success();
}

// Percentile clipping's block norms given to an update (see the top of this
// file): leaf i's are data[offsets[i], offsets[i] + blocks[i]).
struct GivenNorms {
  const double* data = nullptr;  // null: each leaf's come from its grads
  std::vector<int64_t> offsets, blocks;
};

inline ffi::Error DecodeGivenNorms(const char* op, const ffi::Buffer<ffi::U32>& norms,
                                   ffi::Span<const int64_t> norm_blocks, size_t num_leaves,
                                   int32_t percentile, GivenNorms* out) {
  if (norm_blocks.size() == 0 && norms.element_count() == 0) return ffi::Error::Success();
  if (percentile >= 100 || norm_blocks.size() != num_leaves) {
    return InvalidArgument(op, "block norms are given only with clipping, one count per leaf");
  }
  int64_t total = 0;
  for (int64_t b : norm_blocks) {
    if (b < 0) return InvalidArgument(op, "negative norm_blocks");
    out->offsets.push_back(total);
    out->blocks.push_back(b);
    total += b;
  }
  if (static_cast<int64_t>(norms.element_count()) != 2 * total) {
    Message msg;
    msg << "block norms must have " << 2 * total << " uint32 words (2 per block), got "
        << norms.element_count();
    return InvalidArgument(op, msg.str());
  }
  out->data = reinterpret_cast<const double*>(norms.typed_data());
  return ffi::Error::Success();
}

// The grads of a block_norms call, as leaves (only type, size and grad set),
// checked against its result of `result_words` uint32 words (2 per block).
inline ffi::Error DecodeBlockNormsCall(const char* op, ffi::RemainingArgs args, size_t result_words,
                                       std::vector<LeafCall>* leaves,
                                       std::vector<LeafSpec>* layout) {
  leaves->resize(args.size());
  layout->resize(args.size());
  int64_t total_blocks = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    auto grad = args.get<ffi::AnyBuffer>(i);
    LeafCall& leaf = (*leaves)[i];
    if (!grad.has_value() || !ToElemType(grad->element_type(), &leaf.type)) {
      return InvalidArgument(
          op, "grad " + std::to_string(i) + " must be a float32, bfloat16 or float16 buffer");
    }
    leaf.size = static_cast<int64_t>(grad->element_count());
    leaf.grad = grad->untyped_data();
    (*layout)[i] = LeafSpec{leaf.size, false, 0};
    total_blocks += (leaf.size + kBlockSize - 1) / kBlockSize;
  }
  if (static_cast<int64_t>(result_words) != 2 * total_blocks) {
    return InvalidArgument(op, "the result must have 2 uint32 words per block");
  }
  return ffi::Error::Success();
}

// The operands, results and attributes of each call, after the contexts a
// backend binds first (one definition for both backends).
// adamw8bit's update: no handle; the state arrays travel among the remaining
// operands and results.
template <typename Binding>
auto BindUpdateArrays(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::S32>>()  // count
      .template Arg<ffi::Buffer<ffi::S32>>()  // structure
      .template Arg<ffi::Buffer<ffi::F32>>()  // hyperparameters
      .template Arg<ffi::Buffer<ffi::F32>>()  // quantization maps
      .template Arg<ffi::Buffer<ffi::F32>>()  // clipping rings
      .template Arg<ffi::Buffer<ffi::U32>>()  // given block norms
      .RemainingArgs()                        // grads, params (, state arrays)
      .template Ret<ffi::Buffer<ffi::S32>>()  // count + 1
      .template Ret<ffi::Buffer<ffi::F32>>()  // clipping rings
      .RemainingRets()                        // updates or params (, state arrays)
      .template Attr<ffi::Span<const int32_t>>("leaf_flags")
      .template Attr<bool>("block_wise")
      .template Attr<int32_t>("percentile")
      .template Attr<bool>("write_params")
      .template Attr<int32_t>("optim_bits")
      .template Attr<int64_t>("min_8bit_size")
      .template Attr<ffi::Span<const int64_t>>("norm_blocks");
}

template <typename Binding>
auto BindBlockNorms(Binding binding) {
  return std::move(binding)
      .RemainingArgs()                         // grads
      .template Ret<ffi::Buffer<ffi::U32>>();  // norms u32[B, 2]
}

// The paged update: the registry handle in and out, then the same as above,
// and the layout's key.
template <typename Binding>
auto BindUpdate(Binding binding) {
  return BindUpdateArrays(std::move(binding)
                              .template Arg<HandleBuffer>()   // handle
                              .template Ret<HandleBuffer>())  // handle (new when fresh)
      .template Attr<int64_t>("layout_key")
      .template Attr<int64_t>("first_leaf")
      .template Attr<ffi::Span<const int64_t>>("chunk_starts")
      .template Attr<ffi::Span<const int32_t>>("layout_flags")
      .template Attr<ffi::Span<const int64_t>>("layout_sizes");
}

// Export and import list their operands in opposite directions (the same
// buffers as results, then as operands): alike by design.
template <typename Binding>
auto BindExport(Binding binding) {
  return std::move(binding)
      .template Arg<HandleBuffer>()           // handle
      .template Arg<ffi::Buffer<ffi::S32>>()  // count
      .template Ret<ffi::Buffer<ffi::S32>>()  // the step the moments are at
      .template Ret<ffi::Buffer<ffi::U8>>()   // codes
      .template Ret<ffi::Buffer<ffi::F32>>()  // floats
      .template Attr<ffi::Span<const int32_t>>("leaf_flags")
      .template Attr<bool>("block_wise")
      .template Attr<int64_t>("layout_key")
      .template Attr<ffi::Span<const int64_t>>("leaf_sizes");
}

template <typename Binding>
auto BindImport(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::S32>>()  // count
      .template Arg<ffi::Buffer<ffi::U8>>()   // codes
      .template Arg<ffi::Buffer<ffi::F32>>()  // floats
      .template Ret<HandleBuffer>()           // a new handle
      .template Ret<ffi::Buffer<ffi::S32>>()  // count
      .template Attr<ffi::Span<const int32_t>>("leaf_flags")
      .template Attr<bool>("block_wise")
      .template Attr<int64_t>("layout_key")
      .template Attr<ffi::Span<const int64_t>>("leaf_sizes");
}

// The state arrays of export and import, packed leaf by leaf: `codes` holds
// state1 then state2 of each 8-bit leaf (uint8), `floats` absmax1 then
// absmax2 of each 8-bit leaf and state1 then state2 of each leaf with float32
// moments (optax_paged8bit/_layout.py packs and unpacks them the same way).
inline ffi::Error DecodeFlatState(const char* op, ffi::Span<const int32_t> flags,
                                  ffi::Span<const int64_t> sizes, bool block_wise, void* codes,
                                  size_t codes_count, void* floats, size_t floats_count,
                                  std::vector<LeafArrays>* leaves, std::vector<LeafSpec>* layout) {
  if (sizes.size() != flags.size()) {
    return InvalidArgument(op, "leaf_sizes must have one size per leaf flag");
  }
  size_t num_leaves = flags.size();
  leaves->resize(num_leaves);
  layout->resize(num_leaves);
  auto* code_at = static_cast<uint8_t*>(codes);
  auto* float_at = static_cast<float*>(floats);
  size_t code_used = 0, float_used = 0;
  for (size_t i = 0; i < num_leaves; ++i) {
    LeafArrays& leaf = (*leaves)[i];
    if (sizes[i] < 0) return InvalidArgument(op, "negative leaf size");
    leaf.size = sizes[i];
    leaf.is_8bit = (flags[i] & kLeaf8bit) != 0;
    leaf.num_scales = NumScales(leaf.size, leaf.is_8bit, block_wise);
    size_t n = static_cast<size_t>(leaf.size), k = static_cast<size_t>(leaf.num_scales);
    if (leaf.is_8bit) {
      leaf.state1 = code_at + code_used;
      leaf.state2 = code_at + code_used + n;
      leaf.absmax1 = float_at + float_used;
      leaf.absmax2 = float_at + float_used + k;
      code_used += 2 * n;
      float_used += 2 * k;
    } else {
      leaf.state1 = float_at + float_used;
      leaf.state2 = float_at + float_used + n;
      float_used += 2 * n;
    }
    (*layout)[i] = LeafSpec{leaf.size, leaf.is_8bit, leaf.num_scales};
  }
  if (code_used != codes_count || float_used != floats_count) {
    Message msg;
    msg << "the packed state must have " << code_used << " codes and " << float_used
        << " floats for these leaves, got " << codes_count << " and " << floats_count;
    return InvalidArgument(op, msg.str());
  }
  return ffi::Error::Success();
}

// The largest count a state may have: the next update writes count + 1.
constexpr int64_t kMaxCount = INT32_MAX - 1;

inline ffi::Error CheckImportCount(const char* op, int64_t count) {
  if (count < 0 || count > kMaxCount) {
    return InvalidArgument(
        op, "count must be in 0.." + std::to_string(kMaxCount) + ", got " + std::to_string(count));
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckUpdateCount(const char* op, int64_t count) {
  if (count < 0 || count > kMaxCount) {
    return InvalidArgument(op, "the opt_state's count is " + std::to_string(count) +
                                   "; an update needs a count in 0.." + std::to_string(kMaxCount));
  }
  return ffi::Error::Success();
}

// What an update checks once its host scalars are read (on the GPU after the
// one synchronisation): the traced layout-fixing arguments and the count.
inline ffi::Error CheckUpdateScalars(const char* op, const int32_t* structure,
                                     size_t structure_size, const StructureAttrs& attrs,
                                     int64_t count) {
  if (auto e = CheckStructure(op, structure, structure_size, attrs); e.failure()) return e;
  return CheckUpdateCount(op, count);
}

inline Registry::Request MakeRequest(uint32_t handle_bits, int64_t layout_key, Platform platform,
                                     int device, const std::vector<LeafSpec>& layout) {
  Registry::Request r;
  r.handle_bits = handle_bits;
  r.layout_key = static_cast<uint32_t>(layout_key);
  r.platform = platform;
  r.device = device;
  r.layout = &layout;
  return r;
}

// What an update call decodes: its leaves and their layout, and for the
// arrays-state variant (adamw8bit) the state arrays it reads and writes.
struct DecodedUpdate {
  std::vector<LeafCall> leaves;
  std::vector<LeafSpec> layout;
  std::vector<LeafArrays> state_in, state_out;
  GivenNorms norms;  // percentile clipping's block norms, when given
};

// Checks the count, hyperparameters, maps, rings and given block norms, and
// decodes the leaves (and, with state_arrays, the 4 state arrays per leaf on
// both sides). Both backends' update handlers start here.
inline ffi::Error DecodeUpdate(
    const char* op, const ffi::Buffer<ffi::S32>& count, const ffi::Buffer<ffi::S32>& structure,
    const ffi::Buffer<ffi::F32>& hyper, const ffi::Buffer<ffi::F32>& qmaps,
    const ffi::Buffer<ffi::F32>& rings, const ffi::Buffer<ffi::U32>& norms,
    ffi::Span<const int64_t> norm_blocks, ffi::RemainingArgs args, ffi::RemainingRets rets,
    ffi::Span<const int32_t> flags, bool block_wise, int32_t percentile, bool state_arrays,
    DecodedUpdate* out, size_t staged_args = 0, size_t staged_rets = 0) {
  if (count.element_count() != 1) return InvalidArgument(op, "count must be an int32 scalar");
  if (structure.element_count() != 0 && structure.element_count() != kStructureValues) {
    return InvalidArgument(op, "structure must be int32[5] or empty");
  }
  if (auto e = CheckUpdateAttrs(op, hyper, qmaps, rings, flags.size(), percentile); e.failure()) {
    return e;
  }
  if (auto e = DecodeGivenNorms(op, norms, norm_blocks, flags.size(), percentile, &out->norms);
      e.failure()) {
    return e;
  }
  size_t num_state = state_arrays ? NumStateArrays(flags) : 0;
  if (auto e = DecodeUpdateLeaves(op, args, rets, flags, block_wise, num_state + staged_args,
                                  num_state + staged_rets, &out->leaves, &out->layout);
      e.failure()) {
    return e;
  }
  if (!state_arrays) return ffi::Error::Success();
  size_t n = out->leaves.size();
  std::vector<LeafSpec> in_layout, out_layout;
  auto get_in = [&](size_t i) { return *args.get<ffi::AnyBuffer>(2 * n + i); };
  auto get_out = [&](size_t i) { return **rets.get<ffi::AnyBuffer>(n + i); };
  if (auto e =
          DecodeStateArrays(op, num_state, get_in, flags, block_wise, &out->state_in, &in_layout);
      e.failure()) {
    return e;
  }
  if (auto e = DecodeStateArrays(op, num_state, get_out, flags, block_wise, &out->state_out,
                                 &out_layout);
      e.failure()) {
    return e;
  }
  std::string mismatch = DescribeLayoutMismatch(in_layout, out->layout);
  if (!mismatch.empty()) {
    return InvalidArgument(op, "state arrays do not fit the params: " + mismatch);
  }
  return ffi::Error::Success();
}

// What a step reads and what it writes, per leaf: the same memory for a
// registry slot (updated in place); for adamw8bit the call's operands and its
// results, which XLA may or may not have aliased (no copy either way).
struct StepState {
  LeafState in;
  LeafState out;
};

inline LeafState AsLeafState(const LeafArrays& a) {
  return LeafState{a.state1, a.state2, static_cast<float*>(a.absmax1),
                   static_cast<float*>(a.absmax2)};
}

inline std::vector<StepState> ArrayStates(const DecodedUpdate& call) {
  std::vector<StepState> states(call.leaves.size());
  for (size_t i = 0; i < states.size(); ++i) {
    states[i] = StepState{AsLeafState(call.state_in[i]), AsLeafState(call.state_out[i])};
  }
  return states;
}

// The slot's leaves first.. of a call with `count` leaves, updated in place,
// or (`staged` not null) read from the slot and written to `staged`, which
// holds those leaves as the arena does (StepChunk).
inline std::vector<StepState> SlotStates(const Slot& slot, int64_t first, size_t count,
                                         void* staged = nullptr) {
  std::vector<StepState> states(count);
  const char* base = slot.arena + (slot.arena ? slot.offsets[first] : 0);
  auto moved = [&](void* p) -> void* {
    if (staged == nullptr || p == nullptr) return p;
    return static_cast<char*>(staged) + (static_cast<const char*>(p) - base);
  };
  for (size_t i = 0; i < count; ++i) {
    const LeafState& in = slot.leaves[first + i];
    LeafState out{moved(in.state1), moved(in.state2), static_cast<float*>(moved(in.absmax1)),
                  static_cast<float*>(moved(in.absmax2))};
    states[i] = StepState{in, out};
  }
  return states;
}

// One call of a paged step (see update above): which leaves it steps, and
// whether it stages their moments or commits the step.
struct StepChunk {
  std::vector<LeafSpec> layout;  // every leaf, for a step of several calls (else empty)
  std::vector<int64_t> starts;   // the first leaf of each call of the step
  size_t index = 0;              // this call's place in starts
  size_t leaves = 0;             // this call's number of leaves

  int64_t first() const { return starts[index]; }
  bool commit() const { return index + 1 == starts.size(); }
  // The leaf after call k's last (a step of several calls).
  int64_t end(size_t k) const {
    return k + 1 < starts.size() ? starts[k + 1] : static_cast<int64_t>(layout.size());
  }
  // The count the call returns after step `count` + 1: advanced by the
  // commit only (a stage returns it unchanged).
  int32_t CountAfter(int64_t count) const {
    return static_cast<int32_t>(commit() ? count + 1 : count);
  }
  size_t staged_args() const { return commit() ? starts.size() - 1 : 0; }
  size_t staged_rets() const { return commit() ? 0 : 1; }
  // Arena bytes of leaves begin..end.
  size_t Bytes(int64_t begin, int64_t end) const {
    size_t bytes = 0;
    for (int64_t i = begin; i < end; ++i) bytes += LeafArenaBytes(layout[i]);
    return bytes;
  }
};

// Reads the chunk attributes; `leaves` is set by MatchChunkLeaves once the
// call's leaves are decoded.
inline ffi::Error DecodeChunkAttrs(const char* op, int64_t first_leaf,
                                   ffi::Span<const int64_t> chunk_starts,
                                   ffi::Span<const int32_t> layout_flags,
                                   ffi::Span<const int64_t> layout_sizes, bool block_wise,
                                   StepChunk* out) {
  out->starts.assign(chunk_starts.begin(), chunk_starts.end());
  if (layout_flags.size() != layout_sizes.size()) {
    return InvalidArgument(op, "layout_flags and layout_sizes must have one entry per leaf");
  }
  size_t n = layout_flags.size();
  out->layout.clear();
  for (size_t i = 0; i < n; ++i) {
    if (layout_sizes[i] < 0) return InvalidArgument(op, "negative leaf size in layout_sizes");
    bool is_8bit = (layout_flags[i] & kLeaf8bit) != 0;
    out->layout.push_back(
        LeafSpec{layout_sizes[i], is_8bit, NumScales(layout_sizes[i], is_8bit, block_wise)});
  }
  const std::vector<int64_t>& s = out->starts;
  bool ordered = !s.empty() && s[0] == 0;
  for (size_t k = 1; ordered && k < s.size(); ++k) {
    ordered = s[k] > s[k - 1] && s[k] < static_cast<int64_t>(n);
  }
  auto at = std::find(s.begin(), s.end(), first_leaf);
  if (!ordered || at == s.end() || (s.size() == 1) != (n == 0)) {
    return InvalidArgument(op,
                           "chunk_starts must be 0 then increasing leaf indices below the number "
                           "of leaves (one call: [0] with empty layout_flags and layout_sizes), "
                           "and first_leaf one of them");
  }
  out->index = at - s.begin();
  return ffi::Error::Success();
}

// Checks the call's leaves against its place in the state's layout (a step
// of one call: its leaves are the layout).
inline ffi::Error MatchChunkLeaves(const char* op, const std::vector<LeafSpec>& call_layout,
                                   StepChunk* chunk) {
  chunk->leaves = call_layout.size();
  if (chunk->starts.size() == 1) return ffi::Error::Success();
  std::vector<LeafSpec> expected(chunk->layout.begin() + chunk->first(),
                                 chunk->layout.begin() + chunk->end(chunk->index));
  std::string mismatch = DescribeLayoutMismatch(expected, call_layout);
  if (!mismatch.empty()) {
    return InvalidArgument(op, "the call's leaves do not fit leaves " +
                                   std::to_string(chunk->first()) +
                                   ".. of layout_flags and "
                                   "layout_sizes: " +
                                   mismatch);
  }
  return ffi::Error::Success();
}

// Only the first call of a step may meet a fresh token (and make the slot);
// the later ones get the handle it returned.
inline ffi::Error CheckChunkHandle(const char* op, const StepChunk& chunk, uint32_t handle_bits) {
  if (chunk.first() == 0 || !IsFreshToken(handle_bits)) return ffi::Error::Success();
  return InvalidArgument(op, "a step's call for leaves " + std::to_string(chunk.first()) +
                                 ".. got a fresh handle: it must get the handle that the call "
                                 "for leaves 0.. returned");
}

// What a paged update call decodes: the call (DecodeUpdate), its place in the
// step, and a chunked step's staged moments: the one a stage writes, or those
// the commit copies in (from the k-th stage, for its leaves starts[k]..).
struct DecodedPagedUpdate {
  DecodedUpdate call;
  StepChunk chunk;
  void* staged_out = nullptr;
  std::vector<const void*> staged_in;

  // The slot's layout: every leaf of the state.
  const std::vector<LeafSpec>& state_layout() const {
    return chunk.starts.size() == 1 ? call.layout : chunk.layout;
  }
};

inline ffi::Error DecodeStaged(const char* op, ffi::RemainingArgs args, ffi::RemainingRets rets,
                               DecodedPagedUpdate* out) {
  const StepChunk& chunk = out->chunk;
  size_t m = chunk.leaves;
  auto check = [&](const ffi::AnyBuffer& b, int64_t begin, int64_t end) {
    size_t want = chunk.Bytes(begin, end);
    if (b.element_type() == ffi::DataType::U8 && b.size_bytes() == want) return std::string();
    return "the staged moments of leaves " + std::to_string(begin) + ".." + std::to_string(end) +
           " must be uint8[" + std::to_string(want) + "], got " + std::to_string(b.size_bytes()) +
           " bytes";
  };
  if (!chunk.commit()) {
    auto b = rets.get<ffi::AnyBuffer>(m);
    if (!b.has_value()) return InvalidArgument(op, "the staged moments result is not a buffer");
    std::string e = check(**b, chunk.first(), chunk.end(chunk.index));
    if (!e.empty()) return InvalidArgument(op, e);
    out->staged_out = (*b)->untyped_data();
    return ffi::Error::Success();
  }
  for (size_t k = 0; k + 1 < chunk.starts.size(); ++k) {
    auto b = args.get<ffi::AnyBuffer>(2 * m + k);
    if (!b.has_value()) return InvalidArgument(op, "a staged moments operand is not a buffer");
    std::string e = check(*b, chunk.starts[k], chunk.end(k));
    if (!e.empty()) return InvalidArgument(op, e);
    out->staged_in.push_back(b->untyped_data());
  }
  return ffi::Error::Success();
}

// Both backends' paged update handlers start here: DecodeUpdate of the call's
// leaves (and its staged operands or result), checked against the chunk
// attributes.
inline ffi::Error DecodePagedUpdate(
    const char* op, const ffi::Buffer<ffi::S32>& count, const ffi::Buffer<ffi::S32>& structure,
    const ffi::Buffer<ffi::F32>& hyper, const ffi::Buffer<ffi::F32>& qmaps,
    const ffi::Buffer<ffi::F32>& rings, const ffi::Buffer<ffi::U32>& norms,
    ffi::Span<const int64_t> norm_blocks, ffi::RemainingArgs args, ffi::RemainingRets rets,
    ffi::Span<const int32_t> flags, bool block_wise, int32_t percentile, int64_t first_leaf,
    ffi::Span<const int64_t> chunk_starts, ffi::Span<const int32_t> layout_flags,
    ffi::Span<const int64_t> layout_sizes, DecodedPagedUpdate* out) {
  if (auto e = DecodeChunkAttrs(op, first_leaf, chunk_starts, layout_flags, layout_sizes,
                                block_wise, &out->chunk);
      e.failure()) {
    return e;
  }
  if (auto e = DecodeUpdate(op, count, structure, hyper, qmaps, rings, norms, norm_blocks, args,
                            rets, flags, block_wise, percentile, false, &out->call,
                            out->chunk.staged_args(), out->chunk.staged_rets());
      e.failure()) {
    return e;
  }
  if (auto e = MatchChunkLeaves(op, out->call.layout, &out->chunk); e.failure()) return e;
  return DecodeStaged(op, args, rets, out);
}

// The step's states: the slot's leaves of the call, written in place, or by
// a stage to its staged result.
inline std::vector<StepState> CallStates(const Slot& slot, const DecodedPagedUpdate& u) {
  return SlotStates(slot, u.chunk.first(), u.chunk.leaves, u.staged_out);
}

// The commit's copies into the slot: stage k's moments to its leaves' bytes
// of the arena.
struct ArenaCopy {
  char* to;
  const void* from;
  size_t bytes;
};

inline std::vector<ArenaCopy> StagedCopies(const Slot& slot, const DecodedPagedUpdate& u) {
  std::vector<ArenaCopy> copies;
  for (size_t k = 0; k < u.staged_in.size(); ++k) {
    size_t at = slot.offsets[u.chunk.starts[k]];
    size_t bytes = slot.offsets[u.chunk.end(k)] - at;
    if (bytes > 0) copies.push_back({slot.arena + at, u.staged_in[k], bytes});
  }
  return copies;
}

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_FFI_COMMON_H_
