// Torch binding of the SVDQuant CUDA kernels: ops svdq_cuda::quantize_act and svdq_cuda::w4a4_gemm.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

svdq::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return svdq::DType::F32;
    case at::kHalf: return svdq::DType::F16;
    case at::kBFloat16: return svdq::DType::BF16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, const at::Tensor& smooth,
                                                            const at::Tensor& proj_down, double shift,
                                                            bool is_unsigned) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 64 == 0, "x must be [M, K] with K a multiple of 64");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous(), sc = smooth.contiguous(), dc = proj_down.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), R = dc.size(0);
  auto qx = at::empty({M, K / 2}, xc.options().dtype(at::kByte));
  auto ascales = at::empty({M, K / 64}, xc.options().dtype(at::kFloat));
  auto lora_act = at::empty({M, R}, xc.options().dtype(at::kFloat));
  C10_CUDA_CHECK(svdq::quantize_act(xc.data_ptr(), dtype_of(xc, "x"), sc.data_ptr(), dtype_of(sc, "smooth"),
                                    dc.data_ptr(), dtype_of(dc, "proj_down"), qx.data_ptr<uint8_t>(),
                                    ascales.data_ptr<float>(), lora_act.data_ptr<float>(), M, K, R,
                                    static_cast<float>(shift), is_unsigned, c10::cuda::getCurrentCUDAStream()));
  return {qx, ascales, lora_act};
}

at::Tensor w4a4_gemm(const at::Tensor& qx, const at::Tensor& ascales, const at::Tensor& qweight,
                     const at::Tensor& wscales, const at::Tensor& lora_act, const at::Tensor& proj_up,
                     const std::optional<at::Tensor>& bias, bool is_unsigned, at::ScalarType out_dtype) {
  check_cuda(qx, "qx");
  TORCH_CHECK(qx.scalar_type() == at::kByte && qweight.scalar_type() == at::kByte, "qx, qweight must be uint8");
  const c10::cuda::CUDAGuard guard(qx.device());
  const auto qxc = qx.contiguous(), qwc = qweight.contiguous(), wsc = wscales.contiguous();
  const auto asc = ascales.to(at::kFloat).contiguous(), lac = lora_act.to(at::kFloat).contiguous();
  const auto upc = proj_up.contiguous();
  const int64_t M = qxc.size(0), K = 2 * qxc.size(1), N = qwc.size(0), R = lac.size(1);
  auto out = at::empty({M, N}, qxc.options().dtype(out_dtype));
  at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  C10_CUDA_CHECK(svdq::w4a4_gemm(
      qxc.data_ptr<uint8_t>(), asc.data_ptr<float>(), qwc.data_ptr<uint8_t>(), wsc.data_ptr(),
      dtype_of(wsc, "wscales"), lac.data_ptr<float>(), upc.data_ptr(), dtype_of(upc, "proj_up"),
      bc.defined() ? bc.data_ptr() : nullptr, bc.defined() ? dtype_of(bc, "bias") : svdq::DType::F32, out.data_ptr(),
      dtype_of(out, "out"), M, N, K, R, is_unsigned, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY(svdq_cuda, m) {
  m.def("quantize_act(Tensor x, Tensor smooth, Tensor proj_down, float shift, bool is_unsigned) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("w4a4_gemm(Tensor qx, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act, Tensor proj_up, "
        "Tensor? bias, bool is_unsigned, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(svdq_cuda, CUDA, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("w4a4_gemm", &w4a4_gemm);
}
