// AMX tile multiplies for the low-precision panels of gemm_lowp_cpu.cpp, which picks them from
// kAmxMinRows (bf16) / kAmxMinRowsInt8 (int8) rows on when the CPU has AMX and Linux grants it.
//
// Why tiles from a few rows on: one tdpbf16ps does 16 x 16 x 32 multiply-adds, so once a panel is
// shared by enough rows the FMA kernels' per-row multiply-adds, not the weight bytes, are the
// time. bf16 panels are already AMX's B operand layout (each column's k-pair side by side, read
// with a 128-byte stride out of the 32-column panel); int8 panels are converted to bf16 (exact:
// -127..127 are bf16 integers), group by group just before their tiles load (up to 32 rows: the
// conversion overlaps the tile multiplies) or once per panel (more rows). bf16 rounds the
// activations to bf16 (as oneDNN does); int8 splits them into two bf16 parts, x = hi + lo with
// |x - hi - lo| <= 2^-16 |x|, so int8 keeps (nearly) fp32 activations for twice the tile
// multiplies, which cost less than the conversion.
#include <ATen/Parallel.h>

#include "lowp_panel.h"

#if defined(LORASERVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "widen.h"

namespace lowp {
namespace {

// AMX: tiles of 16 rows x 64 bytes; a tdpbf16ps multiplies A (16 rows x 16 k-pairs, bf16) by B
// (16 k-pairs x 16 columns, each column's pair side by side: the bf16 panel layout, read with a
// 128-byte stride out of the 32-column panel) into C (16 x 16 fp32).
constexpr int64_t kAmxRows = 16;   // rows of an A / C tile
constexpr int64_t kAmxPairs = 16;  // k-pairs of a tile: a group of 32 k
// activation rows per work item: their bf16 copy (K * 2 bytes a row, twice for int8) stays in L2
constexpr int64_t kAmxChunkBytes = 1 << 20;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: C (2 row tiles x 2 column halves), 4/5: A (the two row tiles), 6/7: B (the halves)
TileConfig tile_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kAmxRows;
    c.colsb[t] = 64;
  }
  return c;
}

LS_INLINE __m512i round_bf16(__m512i bits) {  // round to nearest even; result in each lane's low half
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
}

// rows [r0, r0 + rows) of x as bf16 tiles' rows (kpad columns, zeros past K and past M): part 0
// is x rounded to bf16; with two parts, part 1 is the rounded remainder x - part 0.
void amx_activations(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t r0, int64_t rows, int64_t kpad,
                     int parts, uint16_t* out) {
  const int64_t part = rows * kpad;
  for (int64_t m = 0; m < rows; ++m) {
    uint16_t* hi = out + m * kpad;
    uint16_t* lo = out + part + m * kpad;
    if (r0 + m >= M) {
      std::memset(hi, 0, kpad * 2);
      if (parts > 1) std::memset(lo, 0, kpad * 2);
      continue;
    }
    const float* xr = x + (r0 + m) * ldx;
    for (int64_t k = 0; k < kpad; k += 16) {
      const __mmask16 mk = simd::mask(K - k);
      const __m512 v = _mm512_maskz_loadu_ps(mk, xr + k);
      const __m512i h = round_bf16(_mm512_castps_si512(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), _mm512_cvtepi32_epi16(h));
      if (parts > 1) {
        const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k),
                            _mm512_cvtepi32_epi16(round_bf16(_mm512_castps_si512(rest))));
      }
    }
  }
}

// group g (16 k-pairs) of an int8 panel [K, 32] as bf16 [16 pairs, 32, 2], zero past K
LS_INLINE void int8_group_bf16(const int8_t* w, int64_t K, int64_t g, uint16_t* out) {
  widen::int8_pairs_bf16(w, K, g * kAmxPairs, kAmxPairs, out);
}

// the whole panel, for chunks of more than one row block (converted once, read by every block)
void int8_panel_bf16(const int8_t* w, int64_t K, int64_t groups, uint16_t* out) {
  widen::int8_pairs_bf16(w, K, 0, groups * kAmxPairs, out);
}

// RT row tiles (16 or 32 rows) x one panel over `groups` groups of 16 k-pairs: A rows at a (lda
// elements apart; `parts` activation parts, part elements apart), B group g at b + g * 1024
// elements, or at `tail` for the last group when given. Rows [0, rows) of the result go to y.
// CONV: b is an int8 panel, converted group by group into `ring` (two groups, alternately) just
// before its tiles load, so the conversion overlaps the previous group's tile multiplies (one
// block of rows: nothing to share a whole converted panel with).
template <int RT, int PARTS, bool CONV = false>
void amx_block(const uint16_t* a, int64_t lda, int64_t part, const void* b, const uint16_t* tail,
               int64_t groups, const Panel& t, int64_t rows, float* y, int64_t ldy, uint16_t* ring = nullptr) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (RT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* bg;
    if constexpr (CONV) {
      bg = ring + (g & 1) * kAmxPairs * 2 * kNR;
      int8_group_bf16(static_cast<const int8_t*>(b), t.k, g, const_cast<uint16_t*>(bg));
    } else {
      bg = tail && g + 1 == groups ? tail : static_cast<const uint16_t*>(b) + g * kAmxPairs * 2 * kNR;
    }
    _tile_loadd(6, bg, 2 * kNR * 2);
    _tile_loadd(7, bg + 32, 2 * kNR * 2);
#pragma GCC unroll 2
    for (int p = 0; p < PARTS; ++p) {
      const uint16_t* ag = a + p * part + g * 2 * kAmxPairs;
      _tile_loadd(4, ag, lda * 2);
      if constexpr (RT == 2) _tile_loadd(5, ag + kAmxRows * lda, lda * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (RT == 2) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  alignas(64) float c[2 * RT][kAmxRows][16];
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  if constexpr (RT == 2) {
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t rt = m / kAmxRows, r = m % kAmxRows;
    put_reg(y + m * ldy, t, 0, _mm512_load_ps(c[2 * rt][r]));
    put_reg(y + m * ldy, t, 16, _mm512_load_ps(c[2 * rt + 1][r]));
  }
}

}  // namespace

bool amx_enabled() {
  // Linux hands out AMX's tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

void amx_linear(bool bf16, bool bf16_act, const float* xp, int64_t ldx, int64_t M, int64_t K, const char* wp,
                int64_t panel_bytes, int64_t P, int64_t n, const float* sp, const float* bp, float* yp) {
  const int parts = bf16_act ? 1 : 2;
  const int64_t pairs = (K + 1) / 2, groups = (pairs + kAmxPairs - 1) / kAmxPairs, kpad = groups * 2 * kAmxPairs;
  // rows per chunk: a multiple of 32 whose activations fit kAmxChunkBytes; chunks of equal size
  const int64_t fit = std::max<int64_t>(32, kAmxChunkBytes / (kpad * 2 * parts) / 32 * 32);
  const int64_t chunks = (M + fit - 1) / fit;
  const int64_t per = ((M + chunks - 1) / chunks + 31) / 32 * 32;
  // every chunk's activations, converted once up front: [chunks][parts][per][kpad]
  std::vector<uint16_t> xa(static_cast<size_t>(chunks * parts * per * kpad));
  const int64_t cstride = parts * per * kpad;
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c)
      amx_activations(xp, ldx, M, K, c * per, per, kpad, parts, xa.data() + c * cstride);
  });
  const bool tail_group = pairs % kAmxPairs != 0;
  const TileConfig cfg = tile_config();
  // one work item: a chunk of rows x one panel; chunk-major, so a chunk's activations stay in L2
  at::parallel_for(0, chunks * P, 1, [&](int64_t lo, int64_t hi) {
    _tile_loadconfig(&cfg);  // tile state is per thread
    std::vector<uint16_t> scratch;  // a whole converted int8 panel, for chunks of several row blocks
    alignas(64) uint16_t tail[kAmxPairs * 2 * kNR];
    alignas(64) uint16_t ring[2 * kAmxPairs * 2 * kNR];
    int64_t converted = -1;
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t c = it / P, p = it % P;
      const Panel t{wp + p * panel_bytes, K, sp ? sp + p * kNR : nullptr, bp ? bp + p * kNR : nullptr,
                    std::min(kNR, n - p * kNR)};
      const int64_t r0 = c * per, rows = std::min(per, M - r0);
      const uint16_t* a = xa.data() + c * cstride;
      float* yc = yp + r0 * n + p * kNR;
      if (!bf16 && rows <= 2 * kAmxRows) {  // one block of rows: converted as the groups go
        if (parts == 1) {
          if (rows > kAmxRows) amx_block<2, 1, true>(a, kpad, 0, t.w, nullptr, groups, t, rows, yc, n, ring);
          else amx_block<1, 1, true>(a, kpad, 0, t.w, nullptr, groups, t, rows, yc, n, ring);
        } else {
          if (rows > kAmxRows) amx_block<2, 2, true>(a, kpad, per * kpad, t.w, nullptr, groups, t, rows, yc, n, ring);
          else amx_block<1, 2, true>(a, kpad, per * kpad, t.w, nullptr, groups, t, rows, yc, n, ring);
        }
        continue;
      }
      const uint16_t* b = static_cast<const uint16_t*>(t.w);
      const uint16_t* tp = nullptr;
      if (!bf16) {
        scratch.resize(static_cast<size_t>(groups * kAmxPairs * 2 * kNR));
        if (converted != p) int8_panel_bf16(static_cast<const int8_t*>(t.w), K, groups, scratch.data());
        converted = p;
        b = scratch.data();
      } else if (tail_group) {  // the last group's pairs past K read zeros, not the next panel
        const int64_t done = (groups - 1) * kAmxPairs;
        std::memset(tail, 0, sizeof tail);
        std::memcpy(tail, b + done * 2 * kNR, (pairs - done) * 2 * kNR * 2);
        tp = tail;
      }
      for (int64_t r = 0; r < rows; r += 2 * kAmxRows) {
        const int64_t left = std::min(2 * kAmxRows, rows - r);
        float* yr = yp + (r0 + r) * n + p * kNR;
        const uint16_t* ar = a + r * kpad;
        if (left > kAmxRows) {
          if (parts == 1) amx_block<2, 1>(ar, kpad, per * kpad, b, tp, groups, t, left, yr, n);
          else amx_block<2, 2>(ar, kpad, per * kpad, b, tp, groups, t, left, yr, n);
        } else {
          if (parts == 1) amx_block<1, 1>(ar, kpad, per * kpad, b, tp, groups, t, left, yr, n);
          else amx_block<1, 2>(ar, kpad, per * kpad, b, tp, groups, t, left, yr, n);
        }
      }
    }
    _tile_release();
  });
}

}  // namespace lowp
#endif
