// usp_npu::ring_attention_update / ring_attention_update_: the fused softmax-statistics merge of
// two ring-attention steps (the contract of torch_npu.npu_ring_attention_update), for the CPU,
// plus Meta kernels so that FakeTensor / torch.compile can propagate shapes.
//
// Layouts (H = N * D, K in {1, 8} identical lanes: lane 0 is read, all K are written):
//   "SBH": attn [S, B, H], stats [B, N, S, K]
//   "TND": attn [T, N, D], stats [T, N, K]; actual_seq_qlen = int64 prefix sums from 0 to T
// Per row: m = max(m_p, m_c); a = l_p e^(m_p - m); b = l_c e^(m_c - m); l = a + b;
//          O = O_p a / l + O_c b / l   (fp32 arithmetic, fp64 when the statistics are fp64).
// `prev` attn may be wider than `cur` attn (fp32 accumulator, bf16 step); outputs take prev's
// dtype. Views are handled by stride arithmetic: only the head dim of attn (and the K lanes of
// stats when K = 8) must be contiguous.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "ring_update_common.h"

namespace usp_npu {
namespace {

using ring_update::MergeArgs;
using ring_update::Operand;

struct Geometry {
  bool sbh = true;
  int64_t n0 = 0, n1 = 0, n2 = 0;  // row grid: S x B x N or T x 1 x N
  int64_t head_dim = 0;
  int64_t lanes = 1;
};

int bits(at::ScalarType t) {
  return static_cast<int>(c10::elementSize(t)) * 8;
}

bool is_attn_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_dtypes(const at::Tensor& prev, const at::Tensor& cur, const at::Tensor& stat) {
  const auto p = prev.scalar_type();
  const auto c = cur.scalar_type();
  const auto s = stat.scalar_type();
  TORCH_CHECK_VALUE(
      is_attn_dtype(p) && is_attn_dtype(c),
      "ring_attention_update: attn_out dtypes must be float32, bfloat16, float16 or float64, got ",
      p, " and ", c);
  TORCH_CHECK_VALUE(
      c == p || bits(c) < bits(p),
      "ring_attention_update: cur_attn_out (", c, ") must have prev_attn_out's dtype (", p,
      ") or a narrower one (the accumulator may be wider, never narrower)");
  TORCH_CHECK_VALUE(
      s == at::kFloat || s == at::kDouble,
      "ring_attention_update: softmax statistics must be float32 (or float64 with float64 "
      "attn_out), got ", s);
  TORCH_CHECK_VALUE(
      (s == at::kDouble) == (p == at::kDouble),
      "ring_attention_update: float64 statistics go with a float64 prev_attn_out and vice versa; "
      "got statistics ", s, " and prev_attn_out ", p);
}

// Validates everything that does not need the data; shared by the CPU and Meta kernels. Sizes
// are read as SymInts, so the Meta kernel also serves FakeTensor with dynamic shapes (each
// comparison then becomes a guard). Returns true for SBH.
bool check_inputs(
    const at::Tensor& prev_out, const at::Tensor& prev_max, const at::Tensor& prev_sum,
    const at::Tensor& cur_out, const at::Tensor& cur_max, const at::Tensor& cur_sum,
    const std::optional<at::Tensor>& actual_seq_qlen, const std::string& layout) {
  TORCH_CHECK_VALUE(
      layout == "SBH" || layout == "TND",
      "ring_attention_update: input_layout must be 'SBH' or 'TND', got '", layout, "'");
  const bool sbh = layout == "SBH";
  TORCH_CHECK_VALUE(
      prev_out.dim() == 3 && prev_out.sym_sizes() == cur_out.sym_sizes(),
      "ring_attention_update: prev/cur attn_out must be 3-D with equal shapes, got ",
      prev_out.sym_sizes(), " and ", cur_out.sym_sizes());
  const at::Tensor* stats[] = {&prev_max, &prev_sum, &cur_max, &cur_sum};
  const int64_t stat_dim = sbh ? 4 : 3;
  for (const at::Tensor* s : stats) {
    TORCH_CHECK_VALUE(
        s->dim() == stat_dim && s->sym_sizes() == prev_max.sym_sizes(),
        "ring_attention_update: the four softmax statistics must share one ", stat_dim,
        "-D shape (", sbh ? "[B, N, S, K]" : "[T, N, K]", "), got ", s->sym_sizes(), " vs ",
        prev_max.sym_sizes());
    TORCH_CHECK_VALUE(
        s->scalar_type() == prev_max.scalar_type(),
        "ring_attention_update: the four softmax statistics must share one dtype");
  }
  const c10::SymInt lanes = prev_max.sym_size(-1);
  TORCH_CHECK_VALUE(
      lanes == 1 || lanes == 8,
      "ring_attention_update: the last statistics dim K must be 1 or 8, got ", lanes);
  check_dtypes(prev_out, cur_out, prev_max);
  if (sbh) {
    const c10::SymInt s = prev_out.sym_size(0), b = prev_out.sym_size(1);
    const c10::SymInt h = prev_out.sym_size(2), n = prev_max.sym_size(1);
    TORCH_CHECK_VALUE(
        prev_max.sym_size(0) == b && prev_max.sym_size(2) == s && n > 0 && h % n == 0,
        "ring_attention_update: SBH statistics ", prev_max.sym_sizes(),
        " must be [B, N, S, K] with B=", b, ", S=", s, " and N dividing H=", h);
    TORCH_CHECK_VALUE(
        !actual_seq_qlen.has_value(),
        "ring_attention_update: actual_seq_qlen is only used with input_layout='TND'");
  } else {
    const c10::SymInt t = prev_out.sym_size(0), n = prev_out.sym_size(1);
    TORCH_CHECK_VALUE(
        prev_max.sym_size(0) == t && prev_max.sym_size(1) == n,
        "ring_attention_update: TND statistics ", prev_max.sym_sizes(),
        " must be [T, N, K] with T=", t, ", N=", n);
    if (actual_seq_qlen.has_value()) {
      const at::Tensor& q = *actual_seq_qlen;
      TORCH_CHECK_VALUE(
          q.dim() == 1 && q.sym_numel() >= 1 &&
              (q.scalar_type() == at::kLong || q.scalar_type() == at::kInt),
          "ring_attention_update: actual_seq_qlen must be a 1-D int64 tensor of prefix sums "
          "starting at 0, got shape ", q.sym_sizes(), " dtype ", q.scalar_type());
    }
  }
  const at::Tensor* attn[] = {&prev_out, &cur_out};
  for (const at::Tensor* a : attn) {
    TORCH_CHECK_VALUE(
        a->sym_size(2) <= 1 || a->sym_stride(2) == 1,
        "ring_attention_update: the innermost attn_out dim (H or D) must be contiguous "
        "(stride 1), got strides ", a->sym_strides());
    TORCH_CHECK_VALUE(a->device() == prev_out.device(), "ring_attention_update: device mismatch");
  }
  for (const at::Tensor* s : stats) {
    TORCH_CHECK_VALUE(
        lanes == 1 || s->sym_stride(-1) == 1,
        "ring_attention_update: the K=8 lanes of the statistics must be contiguous (stride 1), "
        "got strides ", s->sym_strides());
    TORCH_CHECK_VALUE(s->device() == prev_out.device(), "ring_attention_update: device mismatch");
  }
  return sbh;
}

// The row grid of validated CPU inputs.
Geometry geometry(const at::Tensor& prev_out, const at::Tensor& prev_max, bool sbh) {
  Geometry g;
  g.sbh = sbh;
  g.lanes = prev_max.size(-1);
  g.n0 = prev_out.size(0);
  if (sbh) {
    g.n1 = prev_out.size(1);
    g.n2 = prev_max.size(1);
    g.head_dim = prev_out.size(2) / g.n2;
  } else {
    g.n1 = 1;
    g.n2 = prev_out.size(1);
    g.head_dim = prev_out.size(2);
  }
  return g;
}

// Data-dependent check of actual_seq_qlen (CPU only): non-decreasing from 0 to T.
void check_seq_values(const std::optional<at::Tensor>& actual_seq_qlen, int64_t t) {
  if (!actual_seq_qlen.has_value()) {
    return;
  }
  const at::Tensor q = actual_seq_qlen->to(at::kCPU, at::kLong).contiguous();
  const int64_t* v = q.data_ptr<int64_t>();
  const int64_t n = q.numel();
  bool ok = v[0] == 0 && v[n - 1] == t;
  for (int64_t i = 1; ok && i < n; ++i) {
    ok = v[i - 1] <= v[i];
  }
  TORCH_CHECK_VALUE(
      ok, "ring_attention_update: actual_seq_qlen must be non-decreasing prefix sums from 0 to "
      "T=", t, ", got ", q);
}

// Row-grid strides of an attn tensor: SBH (s, b, n) -> s*st0 + b*st1 + n*D; TND (t, 0, n).
Operand attn_operand(const at::Tensor& t, const Geometry& g) {
  if (g.sbh) {
    return {t.data_ptr(), t.stride(0), t.stride(1), g.head_dim};
  }
  return {t.data_ptr(), t.stride(0), 0, t.stride(1)};
}

// Row-grid strides of a statistic: SBH [B, N, S, K] (s, b, n); TND [T, N, K] (t, 0, n).
Operand stat_operand(const at::Tensor& t, const Geometry& g) {
  if (g.sbh) {
    return {t.data_ptr(), t.stride(2), t.stride(0), t.stride(1)};
  }
  return {t.data_ptr(), t.stride(0), 0, t.stride(1)};
}

// Runs the AVX2 kernel where the CPU allows, else the baseline one.
void dispatch(const MergeArgs& args, at::ScalarType p, at::ScalarType c) {
  bool done = false;
#ifdef USP_NPU_HAS_AVX2_KERNEL
  if (ring_update::cpu_has_avx2()) {
    done = ring_update::avx2::run(args, p, c);
  } else {
    done = ring_update::baseline::run(args, p, c);
  }
#else
  done = ring_update::baseline::run(args, p, c);
#endif
  TORCH_CHECK_VALUE(done, "ring_attention_update: unsupported dtypes ", p, " / ", c);
}

// The merge into (out, out_max, out_sum), which may alias (prev, prev_max, prev_sum) exactly.
void merge_into(
    const Geometry& g, const at::Tensor& out, const at::Tensor& out_max,
    const at::Tensor& out_sum, const at::Tensor& prev_out, const at::Tensor& prev_max,
    const at::Tensor& prev_sum, const at::Tensor& cur_out, const at::Tensor& cur_max,
    const at::Tensor& cur_sum) {
  MergeArgs args;
  args.n0 = g.n0;
  args.n1 = g.n1;
  args.n2 = g.n2;
  args.head_dim = g.head_dim;
  args.lanes = g.lanes;
  args.out = attn_operand(out, g);
  args.prev = attn_operand(prev_out, g);
  args.cur = attn_operand(cur_out, g);
  args.out_max = stat_operand(out_max, g);
  args.out_sum = stat_operand(out_sum, g);
  args.prev_max = stat_operand(prev_max, g);
  args.prev_sum = stat_operand(prev_sum, g);
  args.cur_max = stat_operand(cur_max, g);
  args.cur_sum = stat_operand(cur_sum, g);
  dispatch(args, prev_out.scalar_type(), cur_out.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> update_cpu(
    const at::Tensor& prev_out, const at::Tensor& prev_max, const at::Tensor& prev_sum,
    const at::Tensor& cur_out, const at::Tensor& cur_max, const at::Tensor& cur_sum,
    const std::optional<at::Tensor>& actual_seq_qlen, c10::string_view input_layout) {
  const Geometry g = geometry(
      prev_out, prev_max,
      check_inputs(
          prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum, actual_seq_qlen,
          std::string(input_layout)));
  check_seq_values(actual_seq_qlen, g.n0);
  at::Tensor out = at::empty(prev_out.sizes(), prev_out.options());
  at::Tensor out_max = at::empty(prev_max.sizes(), prev_max.options());
  at::Tensor out_sum = at::empty(prev_sum.sizes(), prev_sum.options());
  merge_into(g, out, out_max, out_sum, prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum);
  return {out, out_max, out_sum};
}

void update_inplace_cpu(
    const at::Tensor& acc_out, const at::Tensor& acc_max, const at::Tensor& acc_sum,
    const at::Tensor& cur_out, const at::Tensor& cur_max, const at::Tensor& cur_sum,
    const std::optional<at::Tensor>& actual_seq_qlen, c10::string_view input_layout) {
  const Geometry g = geometry(
      acc_out, acc_max,
      check_inputs(
          acc_out, acc_max, acc_sum, cur_out, cur_max, cur_sum, actual_seq_qlen,
          std::string(input_layout)));
  check_seq_values(actual_seq_qlen, g.n0);
  const at::Tensor* acc[] = {&acc_out, &acc_max, &acc_sum};
  const at::Tensor* cur[] = {&cur_out, &cur_max, &cur_sum};
  for (int i = 0; i < 3; ++i) {
    at::assert_no_internal_overlap(*acc[i]);
    at::assert_no_partial_overlap(*acc[i], *cur[i]);
  }
  at::assert_no_overlap(acc_max, acc_sum);
  merge_into(g, acc_out, acc_max, acc_sum, acc_out, acc_max, acc_sum, cur_out, cur_max, cur_sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> update_meta(
    const at::Tensor& prev_out, const at::Tensor& prev_max, const at::Tensor& prev_sum,
    const at::Tensor& cur_out, const at::Tensor& cur_max, const at::Tensor& cur_sum,
    const std::optional<at::Tensor>& actual_seq_qlen, c10::string_view input_layout) {
  check_inputs(
      prev_out, prev_max, prev_sum, cur_out, cur_max, cur_sum, actual_seq_qlen,
      std::string(input_layout));
  return {
      at::empty_symint(prev_out.sym_sizes(), prev_out.options()),
      at::empty_symint(prev_max.sym_sizes(), prev_max.options()),
      at::empty_symint(prev_sum.sym_sizes(), prev_sum.options())};
}

void update_inplace_meta(
    const at::Tensor& acc_out, const at::Tensor& acc_max, const at::Tensor& acc_sum,
    const at::Tensor& cur_out, const at::Tensor& cur_max, const at::Tensor& cur_sum,
    const std::optional<at::Tensor>& actual_seq_qlen, c10::string_view input_layout) {
  check_inputs(
      acc_out, acc_max, acc_sum, cur_out, cur_max, cur_sum, actual_seq_qlen,
      std::string(input_layout));
}

}  // namespace
}  // namespace usp_npu

// The namespace is registered here and nowhere else (two TORCH_LIBRARY blocks for one namespace
// abort the process when both libraries are loaded).
TORCH_LIBRARY(usp_npu, m) {
  m.def(
      "ring_attention_update(Tensor prev_attn_out, Tensor prev_softmax_max, "
      "Tensor prev_softmax_sum, Tensor cur_attn_out, Tensor cur_softmax_max, "
      "Tensor cur_softmax_sum, *, Tensor? actual_seq_qlen=None, str input_layout=\"SBH\") "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns nothing (the Python wrapper returns the acc_* tensors): an op that returns aliases of
  // three mutated inputs cannot be auto-functionalized by torch.compile.
  m.def(
      "ring_attention_update_(Tensor(a!) acc_attn_out, Tensor(b!) acc_softmax_max, "
      "Tensor(c!) acc_softmax_sum, Tensor cur_attn_out, Tensor cur_softmax_max, "
      "Tensor cur_softmax_sum, *, Tensor? actual_seq_qlen=None, str input_layout=\"SBH\") -> ()",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(usp_npu, CPU, m) {
  m.impl("ring_attention_update", &usp_npu::update_cpu);
  m.impl("ring_attention_update_", &usp_npu::update_inplace_cpu);
}

TORCH_LIBRARY_IMPL(usp_npu, Meta, m) {
  m.impl("ring_attention_update", &usp_npu::update_meta);
  m.impl("ring_attention_update_", &usp_npu::update_inplace_meta);
}
