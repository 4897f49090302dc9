// The Python module fastdiff._C. Loading it runs the op registrations of the library (csrc/ops.cpp and the
// backends: torch.ops.fastdiff); the module itself holds PreparedStep (csrc/step_call.h), the prepared
// sampler_step call of a sampling plan (fastdiff.ops.sampler_step.StepCall). Kept apart from csrc/*.cpp so the
// ops library (CMake, the C++ tests) needs no Python.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "step_call.h"

namespace py = pybind11;

namespace fastdiff {
py::object mean_abs(const at::Tensor& a, const std::optional<at::Tensor>& b, bool norm, bool keep);  // mean_abs.cpp
}

namespace {

// Large steps run without the GIL (other Python threads go on); at batch 1 releasing it costs more than the step.
constexpr int64_t kReleaseGilFrom = 1 << 16;

// call(preds): a list or tuple of K1 tensors, or one batched model output. Parsed by hand: ~0.3 us faster per
// call than pybind's overloads at batch 1, where the whole step is ~2 us.
void call(const fastdiff::PreparedStep& step, py::handle preds) {
  const bool release = step.numel() >= kReleaseGilFrom;
  if (THPVariable_Check(preds.ptr())) {
    const at::Tensor& out = THPVariable_Unpack(preds.ptr());
    if (release) {
      py::gil_scoped_release no_gil;
      step.run_batched(out);
    } else {
      step.run_batched(out);
    }
    return;
  }
  if (!PyList_Check(preds.ptr()) && !PyTuple_Check(preds.ptr())) {
    throw py::type_error(std::string("fastdiff PreparedStep: preds must be a list of tensors or one tensor, got ") +
                         Py_TYPE(preds.ptr())->tp_name);
  }
  py::sequence seq = py::reinterpret_borrow<py::sequence>(preds);
  const size_t n = seq.size();
  TORCH_CHECK(n <= fastdiff::kMaxBranches, "fastdiff PreparedStep: preds holds at most ", fastdiff::kMaxBranches,
              " tensors, got ", n);
  at::Tensor tensors[fastdiff::kMaxBranches];
  for (size_t i = 0; i < n; ++i) {
    py::handle item = seq[i];
    if (!THPVariable_Check(item.ptr())) {
      throw py::type_error("fastdiff PreparedStep: preds[" + std::to_string(i) + "] must be a tensor, got " +
                           Py_TYPE(item.ptr())->tp_name);
    }
    tensors[i] = THPVariable_Unpack(item.ptr());
  }
  const at::TensorList list(tensors, n);
  if (release) {
    py::gil_scoped_release no_gil;
    step.run(list);
  } else {
    step.run(list);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff's native library: the ops (torch.ops.fastdiff) and PreparedStep";
  py::class_<fastdiff::PreparedStep>(m, "PreparedStep", py::dynamic_attr(),
                                     "A sampler_step call with every argument but the predictions bound and checked "
                                     "once (csrc/step_call.h); call(preds) runs it.")
      .def(py::init<const at::Tensor&, std::vector<at::Tensor>, std::vector<at::Tensor>, const at::Tensor&,
                    std::vector<int64_t>, std::vector<double>, std::vector<double>, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, std::vector<at::Tensor>, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, std::vector<int64_t>, std::optional<std::vector<double>>,
                    std::vector<at::Tensor>, std::vector<int64_t>>(),
           py::arg("x"), py::arg("preds"), py::arg("history"), py::arg("seeds"), py::arg("streams"),
           py::arg("weights"), py::arg("coeffs"), py::arg("sample_weights"), py::arg("sample_coeffs"),
           py::arg("outs"), py::arg("side"), py::arg("finite"), py::arg("parts") = std::vector<int64_t>{},
           py::arg("clip") = py::none(), py::arg("stats") = std::vector<at::Tensor>{},
           py::arg("stats_pick") = std::vector<int64_t>{})
      .def("__call__", &call, py::arg("preds"))
      .def_property_readonly("branches", &fastdiff::PreparedStep::branches);
  m.def("mean_abs", &fastdiff::mean_abs, py::arg("a"), py::arg("b") = py::none(), py::arg("norm") = false,
        py::arg("keep") = false,
        "mean |a - b| (mean |a| without b) of float32 CPU tensors of one shape, any strides; norm=True: (that, "
        "mean |a|) from one read; keep=True: a copied into b after it is read (step caching's statistics, "
        "csrc/python/mean_abs.cpp)");
}
