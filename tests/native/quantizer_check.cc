// Checks the quantizer's fast route (adam8bit.h: QuantTables, FastCode)
// (and the kernel's FastCode1/FastCode2) against its definition,
// NearestCode(q, x, LowerBound(q, x)) with SignFix for the first map, on every
// `stride`-th float32 bit pattern, for both maps read from a file of 512
// float32 values (signed map, then unsigned map).
//   quantizer_check MAPS_FILE STRIDE  ->  prints "checked N mismatches M fast F"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "adam8bit.h"

using namespace optax_paged8bit;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MAPS_FILE STRIDE\n", argv[0]);
    return 2;
  }
  float qmaps[2 * kMapSize];
  FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr || std::fread(qmaps, sizeof(float), 2 * kMapSize, f) != 2 * kMapSize) {
    std::fprintf(stderr, "cannot read 512 float32 values from %s\n", argv[1]);
    return 2;
  }
  std::fclose(f);
  uint64_t stride = std::strtoull(argv[2], nullptr, 10);
  auto tables = std::make_unique<QuantTables>();
  BuildQuantTables(qmaps, tables.get());
  uint64_t checked = 0, mismatches = 0;
  for (uint64_t bits = 0; bits <= 0xffffffffull; bits += stride) {
    float x = BitsFloat(static_cast<uint32_t>(bits));
    uint8_t want1 = NearestCode(tables->q1, x, LowerBound(tables->q1, x));
    uint8_t want2 = NearestCode(tables->q2, x, LowerBound(tables->q2, x));
    // Code1 with m = x applies the sign fix to both; compare before it.
    uint8_t got1 = FastCode(tables->q1, tables->edge1, tables->start1, kKeyMinusOne, kSignedShift,
                            kSignedBuckets, tables->fast != 0, x);
    uint8_t got2 = Code2(*tables, x);
    bool in_range1 = !(x < -1.0f || x > 1.0f);  // scaled first moments
    bool in_range2 = !(x < 0.0f || x > 1.0f);   // scaled second moments (and -0)
    if (in_range1 && got1 != want1) {
      if (++mismatches <= 10) std::printf("signed x=%a want %d got %d\n", x, want1, got1);
    }
    if (in_range2 && got2 != want2) {
      if (++mismatches <= 10) std::printf("unsigned x=%a want %d got %d\n", x, want2, got2);
    }
    // The kernel's route for blocks with positive finite scales (x not NaN),
    // sign fix included (m has x's sign there).
    if (!IsNan(x) && in_range1 && FastCode1(*tables, x, x) != SignFix(tables->q1, x, want1)) {
      if (++mismatches <= 10) std::printf("FastCode1 x=%a\n", x);
    }
    if (!IsNan(x) && in_range2 && FastCode2(*tables, x) != want2) {
      if (++mismatches <= 10) std::printf("FastCode2 x=%a\n", x);
    }
    ++checked;
  }
  std::printf("checked %llu mismatches %llu fast %d\n", static_cast<unsigned long long>(checked),
              static_cast<unsigned long long>(mismatches), tables->fast);
  return mismatches == 0 ? 0 : 1;
}
