// Checks the quantizer's fast route (adam8bit.h: QuantTables, Code1/Code2 and
// the kernel's FastCode1/FastCode2) against its definition,
// NearestCode(q, x, LowerBound(q, x)) with SignFix for the first map, on every
// `stride`-th float32 bit pattern, for both maps read from a file of 512
// float32 values (signed map, then unsigned map). Also checks that every
// quotient below 2^-47 in magnitude has the code of a zero of m's sign, which
// the GPU's scale division relies on (ScaleDivisor).
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
  const float* q1 = tables->q1;
  const float* q2 = tables->q2;
  auto want1 = [&](float m, float x) {
    return SignFix(q1, m, NearestCode(q1, x, LowerBound(q1, x)));
  };
  auto want2 = [&](float x) { return NearestCode(q2, x, LowerBound(q2, x)); };
  const uint8_t zero1[2] = {want1(0.0f, 0.0f), want1(-0.0f, -0.0f)};
  const uint8_t zero2 = want2(0.0f);
  uint64_t checked = 0, mismatches = 0;
  auto report = [&](const char* what, float x, int want, int got) {
    if (++mismatches <= 10) std::printf("%s x=%a want %d got %d\n", what, x, want, got);
  };
  for (uint64_t bits = 0; bits <= 0xffffffffull; bits += stride) {
    float x = BitsFloat(static_cast<uint32_t>(bits));
    // m = x: x is m's quotient by a positive scale (or NaN).
    uint8_t w1 = want1(x, x), w2 = want2(x);
    if (Code1(*tables, x, x) != w1) report("Code1", x, w1, Code1(*tables, x, x));
    if (Code2(*tables, x) != w2) report("Code2", x, w2, Code2(*tables, x));
    bool in_range1 = !(x < -1.0f || x > 1.0f) && !IsNan(x);
    bool in_range2 = !(x < 0.0f || x > 1.0f) && !IsNan(x);  // -0 included
    if (in_range1 && FastCode1(*tables, x, x) != w1)
      report("FastCode1", x, w1, FastCode1(*tables, x, x));
    if (in_range2 && FastCode2(*tables, x) != w2) report("FastCode2", x, w2, FastCode2(*tables, x));
    // A quotient below 2^-47 in magnitude, of either sign, for m of either
    // sign: the code of a zero of m's sign.
    if (Abs(x) < 7.105427357601002e-15f) {
      for (int negative = 0; negative < 2; ++negative) {
        float m = negative ? -0.0f : 0.0f;
        if (FastCode1(*tables, m, x) != zero1[negative]) {
          report("tiny FastCode1", x, zero1[negative], FastCode1(*tables, m, x));
        }
      }
      if (FastCode2(*tables, x) != zero2) report("tiny FastCode2", x, zero2, FastCode2(*tables, x));
    }
    ++checked;
  }
  std::printf("checked %llu mismatches %llu fast %d\n", static_cast<unsigned long long>(checked),
              static_cast<unsigned long long>(mismatches), tables->fast);
  return mismatches == 0 ? 0 : 1;
}
