// The slot table's operands as the LoRA kernels take them, checked once for all of them.
//
// Layout: `a` [S, K, G*R] (the G members' A side by side) and each member's B [S, R, out_j], with
// each slot's matrix contiguous and slots any distance apart (stride(0)), because the table keeps
// every slot's tensors in a block of its own (layers/lora.py: a slot's memory is taken when its
// adapter loads, without moving the others). `slot_rank` [S], where given, is the rank each slot
// holds: a rank-8 adapter in a rank-64 table reads 1/8 of the padded bytes and does 1/8 of the work.
//
// Why one description: the row kernels (lora_cpu.cpp), the fused decode pass (gemm_lora_cpu.cpp)
// and the decode stack's split (region_lora.h) read the same table the same way, and each had its
// own copy of these fields, checks and rank clamp. The kernels' entry points raise on a bad
// argument; the decode stack only asks whether its fast path applies and, where it does not,
// leaves the per-kernel call to raise. `OnBad` is that one difference.
#pragma once

#include "aten_min.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

inline bool slot_matrices(const at::Tensor& t) {
  return t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2) && t.stride(0) >= t.size(1) * t.size(2);
}

namespace slot_table {

constexpr int kMaxMembers = 4;  // projections fused in one output (q/k/v: 3)

enum class OnBad { raise, decline };

// One projection group's adapter table: what every kernel reads
struct Table {
  const void* a = nullptr;  // [S, K, G*R] fp32 or bf16
  int64_t a_slot = 0, S = 0, K = 0, R = 0, G = 0;
  bool bf16 = false;
  const void* b[kMaxMembers] = {};  // member j's B [S, R, out[j]], a's dtype
  int64_t b_slot[kMaxMembers] = {}, out[kMaxMembers] = {};
  int64_t off[kMaxMembers + 1] = {};  // member j's first column of the outputs side by side; off[G]: all
  const int64_t* slot_rank = nullptr;  // [S] or null: all R

  int64_t rank(int64_t s) const { return slot_rank ? std::clamp<int64_t>(slot_rank[s], 0, R) : R; }
  int64_t gr() const { return G * R; }
  // member j's own columns [lo, hi) that the outputs' columns [c0, c1) cover (lo >= hi: none)
  std::pair<int64_t, int64_t> member_cols(int64_t j, int64_t c0, int64_t c1) const {
    return {std::max(c0, off[j]) - off[j], std::min(c1, off[j + 1]) - off[j]};
  }
  template <typename T>
  const T* a_of(int64_t slot) const {
    return static_cast<const T*>(a) + slot * a_slot;
  }
  template <typename T>
  const T* b_of(int64_t j, int64_t slot) const {
    return static_cast<const T*>(b[j]) + slot * b_slot[j];
  }
};

// The entries of a call: row rows[e] of the input runs under slot slots[e]
struct Rows {
  const int64_t* rows = nullptr;
  const int64_t* slots = nullptr;
  int64_t N = 0;
};

namespace detail {
// false where `ok` is, after raising with `what` if the caller asked for that
inline bool bad(bool ok, OnBad on_bad, const char* what) {
  TORCH_CHECK(ok || on_bad == OnBad::decline, what);
  return !ok;
}
}  // namespace detail

// a and bs checked against K inputs a row: the table, or nullopt (OnBad::decline) / an error
inline std::optional<Table> table(const at::Tensor& a, const std::vector<at::Tensor>& bs,
                                  const std::optional<at::Tensor>& slot_rank, int64_t K, OnBad on_bad) {
  using detail::bad;
  const auto dt = a.scalar_type();
  if (bad(dt == at::kFloat || dt == at::kBFloat16, on_bad, "the LoRA table must be float32 or bfloat16") ||
      bad(a.device().is_cpu() && slot_matrices(a), on_bad, "a must be [S, in, G*R] on the CPU, each slot contiguous"))
    return std::nullopt;
  const int64_t G = static_cast<int64_t>(bs.size());
  if (bad(G > 0 && G <= kMaxMembers, on_bad, "1 to 4 B matrices")) return std::nullopt;
  Table t;
  t.a = a.data_ptr(), t.a_slot = a.stride(0), t.S = a.size(0), t.K = a.size(1), t.G = G, t.R = a.size(2) / G;
  t.bf16 = dt == at::kBFloat16;
  if (bad(t.K == K && t.R * G == a.size(2), on_bad, "a's shape does not match x or the group")) return std::nullopt;
  if (slot_rank.has_value()) {
    const at::Tensor& sr = *slot_rank;
    if (bad(sr.device().is_cpu() && sr.scalar_type() == at::kLong && sr.is_contiguous() && sr.numel() == t.S,
            on_bad, "slot_rank must be a contiguous CPU int64 tensor with one entry per slot"))
      return std::nullopt;
    t.slot_rank = sr.data_ptr<int64_t>();
  }
  for (int64_t j = 0; j < G; ++j) {
    const at::Tensor& b = bs[j];
    if (bad(slot_matrices(b) && b.scalar_type() == dt && b.device().is_cpu() && b.size(0) == t.S && b.size(1) == t.R,
            on_bad, "bs[j] must be [S, R, out], each slot contiguous, in a's dtype"))
      return std::nullopt;
    t.b[j] = b.data_ptr(), t.b_slot[j] = b.stride(0), t.out[j] = b.size(2);
    t.off[j + 1] = t.off[j] + t.out[j];
  }
  return t;
}

// raises unless the members' outputs side by side are the n columns of the call's output
inline void check_covers(const Table& t, int64_t n) {
  TORCH_CHECK(t.off[t.G] == n, "the B matrices cover ", t.off[t.G], " of ", n, " output columns");
}

// rows / slots checked against M input rows and the table's S slots
inline std::optional<Rows> rows(const at::Tensor& rows, const at::Tensor& slots, int64_t M, int64_t S,
                                OnBad on_bad) {
  using detail::bad;
  if (bad(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, on_bad,
          "rows/slots must be int64") ||
      bad(rows.device().is_cpu() && slots.device().is_cpu() && rows.is_contiguous() && slots.is_contiguous() &&
              rows.numel() == slots.numel(),
          on_bad, "rows/slots mismatch"))
    return std::nullopt;
  Rows r{rows.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), rows.numel()};
  for (int64_t e = 0; e < r.N; ++e) {
    if (bad(r.rows[e] >= 0 && r.rows[e] < M && r.slots[e] >= 0 && r.slots[e] < S, on_bad, "row or slot out of range"))
      return std::nullopt;
  }
  return r;
}

}  // namespace slot_table
