// Torch binding of the SVDQuant CUDA kernels: ops svdq_cuda::quantize_act and svdq_cuda::w4a4_gemm, with the
// argument order of the Python contract (engine/kernels/__init__.py). Every tensor is checked here (device,
// dtype, shape, alignment) so that a bad call is a clear error, never a fault inside a kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

constexpr int64_t kGroup = 64;
constexpr int64_t kInt32Limit = int64_t{1} << 31;

svdq::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return svdq::DType::F32;
    case at::kHalf: return svdq::DType::F16;
    case at::kBFloat16: return svdq::DType::BF16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// On the same CUDA device as `ref` (the op's first tensor).
void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
              "; every tensor of the op must be on the same GPU");
}

// Read with 16-byte vector loads or cp.async: the kernel needs the address 16-byte aligned.
void check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start at a 16-byte aligned address (it is a view at an odd offset: pass .clone())");
}

// The GEMM indexes the scales with 32-bit offsets (rows padded to the tile, any strides).
void check_offsets32(const at::Tensor& t, int64_t rows, int64_t groups, const char* name) {
  TORCH_CHECK((rows + 256) * std::abs(t.stride(0)) + groups * std::abs(t.stride(1)) < kInt32Limit, name,
              "'s strides are too large for this kernel's 32-bit offsets: ", t.strides());
}

// A 16-bit matrix as bf16 hi (+ bf16 lo residual): bf16 passes through; fp16 splits exactly; fp32 keeps ~16 bits.
std::pair<at::Tensor, at::Tensor> as_bf16_pair(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return {t.contiguous(), at::Tensor()};
  const auto f = t.to(at::kFloat).contiguous();
  const auto hi = f.to(at::kBFloat16);
  return {hi, (f - hi.to(at::kFloat)).to(at::kBFloat16)};
}

const __nv_bfloat16* bf16_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, const at::Tensor& smooth,
                                                            const at::Tensor& proj_down, int64_t group_size,
                                                            bool is_unsigned, double shift) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  check_device(smooth, "smooth", x, "x");
  check_device(proj_down, "proj_down", x, "x");
  TORCH_CHECK(group_size == kGroup, "the cuda backend supports group_size 64 only, got ", group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kGroup == 0, "x must be [M, K] with K a multiple of 64, got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == K, "smooth must be [", K, "], got ", smooth.sizes());
  TORCH_CHECK(proj_down.dim() == 2 && proj_down.size(1) == K, "proj_down must be [R, ", K, "], got ",
              proj_down.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous(), sc = smooth.contiguous();
  check_aligned16(xc, "x");
  check_aligned16(sc, "smooth");
  const auto down = as_bf16_pair(proj_down);
  const at::Tensor &down_hi = down.first, &down_lo = down.second;
  check_aligned16(down_hi, "proj_down");
  const int64_t R = proj_down.size(0), G = K / kGroup;
  auto qx = at::empty({M, K / 2}, xc.options().dtype(at::kByte));
  // [M, G] group-major (strides (1, M)) like every backend: the GEMM's per-group loads of it are coalesced,
  // and torch.compile asserts the fake op's strides on the real output
  auto ascales = at::empty({G, M}, xc.options().dtype(at::kFloat)).t();
  auto lora_act = at::empty({M, R}, xc.options().dtype(at::kFloat));
  C10_CUDA_CHECK(svdq::quantize_act(xc.data_ptr(), dtype_of(xc, "x"), sc.data_ptr(), dtype_of(sc, "smooth"),
                                    bf16_ptr(down_hi), bf16_ptr(down_lo), qx.data_ptr<uint8_t>(),
                                    ascales.data_ptr<float>(), lora_act.data_ptr<float>(), M, K, R,
                                    static_cast<float>(shift), is_unsigned, c10::cuda::getCurrentCUDAStream()));
  return {qx, ascales, lora_act};
}

at::Tensor w4a4_gemm(const at::Tensor& qx, const at::Tensor& ascales, const at::Tensor& qweight,
                     const at::Tensor& wscales, const at::Tensor& lora_act, const at::Tensor& proj_up,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& partial,
                     const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& gate, bool is_unsigned, at::ScalarType out_dtype) {
  TORCH_CHECK(qx.is_cuda(), "qx must be a CUDA tensor, got one on ", qx.device());
  check_device(ascales, "ascales", qx, "qx");
  check_device(qweight, "qweight", qx, "qx");
  check_device(wscales, "wscales", qx, "qx");
  check_device(lora_act, "lora_act", qx, "qx");
  check_device(proj_up, "proj_up", qx, "qx");
  if (bias.has_value()) check_device(*bias, "bias", qx, "qx");
  if (partial.has_value()) check_device(*partial, "partial", qx, "qx");
  TORCH_CHECK(residual.has_value() == gate.has_value(), "residual and gate come together: pass both or neither");
  if (residual.has_value()) check_device(*residual, "residual", qx, "qx");
  if (gate.has_value()) check_device(*gate, "gate", qx, "qx");
  TORCH_CHECK(qx.scalar_type() == at::kByte && qweight.scalar_type() == at::kByte && qx.dim() == 2 &&
                  qweight.dim() == 2,
              "qx and qweight must be 2-D uint8 tensors of packed 4-bit codes");
  const int64_t M = qx.size(0), K = 2 * qx.size(1), N = qweight.size(0), G = K / kGroup, R = lora_act.size(1);
  TORCH_CHECK(K % kGroup == 0, "K = ", K, " must be a multiple of 64");
  TORCH_CHECK(qweight.size(1) == K / 2, "qweight must be [N, ", K / 2, "], got ", qweight.sizes());
  TORCH_CHECK(ascales.dim() == 2 && ascales.size(0) == M && ascales.size(1) == G,
              "the cuda backend supports group_size 64 only: ascales must be [", M, ", ", G, "], got ",
              ascales.sizes());
  TORCH_CHECK(wscales.dim() == 2 && wscales.size(0) == N && wscales.size(1) == G, "wscales must be [", N, ", ", G,
              "], got ", wscales.sizes());
  TORCH_CHECK(lora_act.dim() == 2 && lora_act.size(0) == M, "lora_act must be [", M, ", R], got ", lora_act.sizes());
  TORCH_CHECK(proj_up.dim() == 2 && proj_up.size(0) == N && proj_up.size(1) == R, "proj_up must be [", N, ", ", R,
              "], got ", proj_up.sizes());
  TORCH_CHECK(M * K / 2 < kInt32Limit && N * K / 2 < kInt32Limit,
              "qx or qweight is too large for this kernel's 32-bit offsets (M K / 2 = ", M * K / 2,
              ", N K / 2 = ", N * K / 2, ")");
  dtype_of(ascales, "ascales");
  dtype_of(wscales, "wscales");
  const c10::cuda::CUDAGuard guard(qx.device());
  const auto qxc = qx.contiguous(), qwc = qweight.contiguous();
  check_aligned16(qxc, "qx");
  check_aligned16(qwc, "qweight");
  // Scales keep their strides (group-major [N, G] with strides (1, N) is the fast layout); fp32 in the kernel.
  const auto asf = ascales.to(at::kFloat), wsf = wscales.to(at::kFloat);
  check_offsets32(asf, M, G, "ascales");
  check_offsets32(wsf, N, G, "wscales");
  const auto lac = lora_act.to(at::kFloat).contiguous();
  const auto up = as_bf16_pair(proj_up);
  const at::Tensor &up_hi = up.first, &up_lo = up.second;
  at::Tensor bc;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
    bc = bias->contiguous();
  }
  // The kernel stores output pairs as one aligned 4- or 8-byte store, and reads partial, residual and gate the
  // same way, so their rows must be an even number of elements apart: an odd N (no FLUX layer has one) pads
  // them to rows of N + 1 and writes into rows of N + 1, copied out at the end.
  const int64_t ldo = N + N % 2;
  const auto pairs = [&](const at::Tensor& t) {  // contiguous rows of ldo elements, pair-aligned
    const auto c = ldo == N ? t.contiguous() : at::constant_pad_nd(t, {0, 1});
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % (2 * c.element_size()) == 0 ? c : c.clone();
  };
  at::Tensor pc, rc, gc;  // the partial/gate/residual epilogue's operands, in out_dtype
  if (partial.has_value()) {
    TORCH_CHECK(partial->scalar_type() == out_dtype, "partial must have out_dtype ", out_dtype, ", got ",
                partial->scalar_type());
    TORCH_CHECK(partial->dim() == 2 && partial->size(0) == M && partial->size(1) == N, "partial must be [", M, ", ",
                N, "], got ", partial->sizes());
    pc = pairs(*partial);
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == out_dtype && gate->scalar_type() == out_dtype,
                "residual and gate must have out_dtype ", out_dtype, ", got ", residual->scalar_type(), " and ",
                gate->scalar_type());
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N, "residual must be [", M,
                ", ", N, "], got ", residual->sizes());
    TORCH_CHECK(gate->dim() == 2 && gate->size(1) == N && gate->size(0) > 0 && M % gate->size(0) == 0,
                "gate must be [B, ", N, "] with B dividing M = ", M, ", got ", gate->sizes());
    rc = pairs(*residual);
    gc = pairs(*gate);
  }
  auto buf = at::empty({M, ldo}, qxc.options().dtype(out_dtype));
  C10_CUDA_CHECK(svdq::w4a4_gemm(
      qxc.data_ptr<uint8_t>(), asf.data_ptr<float>(), asf.stride(0), asf.stride(1), qwc.data_ptr<uint8_t>(),
      wsf.data_ptr<float>(), wsf.stride(0), wsf.stride(1), lac.data_ptr<float>(), bf16_ptr(up_hi), bf16_ptr(up_lo),
      bc.defined() ? bc.data_ptr() : nullptr, bc.defined() ? dtype_of(bc, "bias") : svdq::DType::F32,
      buf.data_ptr(), dtype_of(buf, "out"), ldo, pc.defined() ? pc.data_ptr() : nullptr, rc.defined() ? rc.data_ptr() : nullptr,
      gc.defined() ? gc.data_ptr() : nullptr, gc.defined() ? static_cast<int>(M / gc.size(0)) : 1, M, N, K, R,
      is_unsigned, c10::cuda::getCurrentCUDAStream()));
  return ldo == N ? buf : buf.narrow(1, 0, N).contiguous();
}

}  // namespace

TORCH_LIBRARY(svdq_cuda, m) {
  m.def("quantize_act(Tensor x, Tensor smooth, Tensor proj_down, int group_size, bool unsigned, float shift) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("w4a4_gemm(Tensor qx, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act, Tensor proj_up, "
        "Tensor? bias, Tensor? partial, Tensor? residual, Tensor? gate, bool unsigned, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdq_cuda, CUDA, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("w4a4_gemm", &w4a4_gemm);
}
