// Op schemas of the fastdiff library. Backends register implementations in csrc/cpu and csrc/cuda
// with TORCH_LIBRARY_IMPL; fastdiff/ops/*.py registers the fake (meta) kernels for torch.compile.
#include <torch/library.h>

// The Python module fastdiff._C (which loads this library) is csrc/python/module.cpp.
TORCH_LIBRARY(fastdiff, m) {
  // Philox4x32-10 words. counter: int64 [N, 4], key: int64 [N, 2], values in [0, 2^32).
  // Returns int64 [N, 4]. Exposed so every backend's words can be checked exactly.
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  // Noise stream spec v1. seeds: int64 [B] (two's-complement for seeds >= 2^63), 0 <= stream < 2^32.
  // Returns [B, *shape] of `dtype` on seeds' device; element i of sample b is the stream's element
  // offset + i (flattened C order).
  m.def("randn(Tensor seeds, int stream, int[] shape, int offset, ScalarType dtype) -> Tensor");
  // The general fused sampler step (docs/design.md §2; spec: sampler_step_reference in
  // fastdiff/ops/sampler_step.py). K1 = len(preds) <= 8, H = len(history) <= 4, D = len(streams) <= 4,
  // M = 2 + H + D, per sample b (weights / coeffs, or row b of sample_weights [B, K1] / sample_coeffs [B, 2M]):
  //   g    = w0 p0 + sum_k>=1 wk (pk - p0)
  //   out  = c_x x + c_g g + sum_j c_h[j] h_j + sum_d c_z[d] z_d    (a noise term only where its coefficient != 0)
  //   side = same with the second row of coefficients                (when side is given)
  // every outs[i] (<= 8) = out; finite[b] = 0 where any pk of sample b has inf/NaN (int32 [B]).
  // clip = [c, d] (diffusers' clip_sample fused; host numbers rounded once to float32, c finite > 0; not with
  // sample_coeffs): the side row s is computed even without side, s_c = -c where s < -c, c where s > c, else s;
  //   out = out + d * (s_c - s)   (float32: t = s_c - s, u = d t, out + u, three roundings, no fma)
  //   side = s_c                   (when side is given)
  // x, history, outs, side float32 [B, ...]; preds float32/float16/bfloat16 (one dtype); seeds int64 [B];
  // all contiguous on one device. An output may be exactly an input (outs[0] = x, side = history[j]).
  // stats = [sums, x_ref, x_keep, q_ref, q_keep], stats_pick = [m, H, W, f, branch]: per-sample statistics of the
  // output and a prediction over a subsample, from the elements the step holds (spec: fastdiff/ops/step_stats.py).
  m.def("sampler_step(Tensor x, Tensor[] preds, Tensor[] history, Tensor seeds, int[] streams, float[] weights, "
        "float[] coeffs, Tensor? sample_weights, Tensor? sample_coeffs, Tensor(a!)[] outs, Tensor(b!)? side, "
        "Tensor(c!)? finite, float[]? clip=None, Tensor(d!)[]? stats=None, int[]? stats_pick=None) -> ()");
  // The per-sample reduction pass (docs/design.md §2; spec: fastdiff/ops/sample_gram.py). With u = (terms[0..K),
  // z_0..z_D) (z_d the spec-v1 normal of (seeds[b], streams[d], element e)), T = K + D <= 8, D <= 4, returns
  // float64 [B, T + T (T + 1) / 2]: row b holds sum_e u_i (i < T), then sum_e u_i u_j (i <= j, row-major). Each
  // sample is cut into chunks of kGramChunk (4096) elements; a chunk's sums accumulate in float64 and the chunks
  // are added in an order fixed by their number (index order; CUDA past 64 chunks: per thread in index order,
  // then a fixed tree) — no atomics: the bits do not depend on the batch size or the thread count.
  // terms float32/float16/bfloat16 (one dtype), contiguous [B, ...]; seeds int64 [B]; one device.
  m.def("sample_gram(Tensor[] terms, Tensor seeds, int[] streams) -> Tensor");
  // Noising and the fused training loss (docs/design.md §4; spec: fastdiff/ops/diffusion_loss.py), with
  // eps[b, i] the spec-v1 normal of (seeds[b], stream, element i) and n the elements per sample:
  //   add_noise:               float32 [B, ...]  alpha[b] z[b, i] + beta[b] eps[b, i]
  //   diffusion_loss:          float32 [B]       weight[b] / n sum_i (pred[b, i] - target[b, i])^2,
  //                                              target = coef_z[b] z[b, i] + coef_eps[b] eps[b, i]
  //   diffusion_loss_backward: pred's dtype and shape, grad_loss[b] weight[b] 2 / n (pred - target)
  // pred, z float32/float16/bfloat16 (each its own dtype), contiguous [B, ...]; alpha, beta, coef_z,
  // coef_eps, weight, grad_loss float32 [B]; seeds int64 [B]; all on one device. The per-sample sums
  // are deterministic (fixed chunks added in order; no atomics).
  m.def("add_noise(Tensor z, Tensor alpha, Tensor beta, Tensor seeds, int stream) -> Tensor");
  m.def("diffusion_loss(Tensor pred, Tensor z, Tensor coef_z, Tensor coef_eps, Tensor weight, Tensor seeds, "
        "int stream) -> Tensor");
  // diffusion_loss_residual: (diffusion_loss, float32 pred - target) in one pass, so that a backward
  // needs no second pass over the noise (CPU, where the normals cost far more than the memory).
  m.def("diffusion_loss_residual(Tensor pred, Tensor z, Tensor coef_z, Tensor coef_eps, Tensor weight, "
        "Tensor seeds, int stream) -> (Tensor, Tensor)");
  m.def("diffusion_loss_backward(Tensor grad_loss, Tensor pred, Tensor z, Tensor coef_z, Tensor coef_eps, "
        "Tensor weight, Tensor seeds, int stream) -> Tensor");
  // The same ops at per-sample flow times t (float32/float64 [B]) on a built-in path, the coefficients computed
  // by the op (fastdiff/gaussian_path.h; on the device for CUDA tensors): path a PathKind with its path_params, prediction a PairKind of a
  // target (1 velocity, 2 eps, 3 x0, 4 score); weight None is 1. A t outside [0, 1] gives NaN for that sample
  // on the GPU; on the CPU it is refused before any work, as is a target that is infinite at t (the score
  // where beta_t = 0). grad_loss may be strided (the expanded gradient of a mean).
  m.def("add_noise_at(Tensor z, Tensor t, Tensor seeds, int stream, int path, float[] path_params) -> Tensor");
  m.def("diffusion_loss_at(Tensor pred, Tensor z, Tensor t, Tensor? weight, Tensor seeds, int stream, int path, "
        "float[] path_params, int prediction) -> Tensor");
  m.def("diffusion_loss_at_residual(Tensor pred, Tensor z, Tensor t, Tensor? weight, Tensor seeds, int stream, "
        "int path, float[] path_params, int prediction) -> (Tensor, Tensor)");
  m.def("diffusion_loss_at_backward(Tensor grad_loss, Tensor pred, Tensor z, Tensor t, Tensor? weight, "
        "Tensor seeds, int stream, int path, float[] path_params, int prediction) -> Tensor");
  // The backward from diffusion_loss*_residual's stored residual: (grad_loss[b] weight[b] 2 / n) residual in
  // `dtype` (pred's), the fused backward's float32 operations in its order.
  m.def("diffusion_loss_residual_backward(Tensor grad_loss, Tensor residual, Tensor? weight, ScalarType dtype) "
        "-> Tensor");
}

