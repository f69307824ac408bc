// normkit._mpi: synchronized BatchNorm over mpi4py communicators (normkit/mpi.h). A module of its
// own, imported by normkit.mpi only, so that `import normkit` never loads MPI. The arguments
// follow batch_norm_forward / batch_norm_backward's rules and messages (batch_norm_args.h).
#include <mpi.h>
#include <mpi4py/mpi4py.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>

#include "batch_norm_args.h"
#include "normkit/batch_norm.h"
#include "normkit/mpi.h"

namespace py = pybind11;

namespace {

using namespace normkit::python;

// The MPI_Comm inside an mpi4py communicator; a TypeError for anything else.
MPI_Comm comm_of(const char* function, const py::object& comm) {
  MPI_Comm* c = PyMPIComm_Get(comm.ptr());
  if (c == nullptr) {
    PyErr_Clear();
    type_error(function, "comm must be an mpi4py communicator (mpi4py.MPI.Comm), got " +
                             py::str(py::type::of(comm)).cast<std::string>());
  }
  return *c;
}

// Converts and checks the arguments with `convert`; when that raises on this rank, the other
// ranks, already on their way into the collective, are told (normkit::mpi::reject_call), and
// the Python exception is raised here as it would be by batch_norm_forward / _backward.
template <class Convert>
auto collectively_checked(MPI_Comm comm, const Convert& convert) -> decltype(convert()) {
  try {
    return convert();
  } catch (const std::exception& e) {
    try {
      normkit::mpi::reject_call(e.what(), comm);
    } catch (const normkit::Error&) {
    }
    throw;
  }
}

py::tuple forward(const py::object& x, const OptionalArray& running_mean,
                  const OptionalArray& running_var, const OptionalArray& weight,
                  const OptionalArray& bias, double momentum, double eps,
                  const py::object& comm_in) {
  const char* function = "sync_batch_norm_forward";
  const MPI_Comm comm = comm_of(function, comm_in);
  BatchNormForwardArgs a = collectively_checked(comm, [&] {
    return batch_norm_forward_args(function, x, running_mean, running_var, weight, bias, true);
  });
  const normkit::BatchNormParams params{eps, momentum};
  // A global batch without values has no statistics and nothing writes them; a rank's own
  // empty piece says nothing about that, so they start defined (zero) here.
  std::fill(a.save_mean.span.begin(), a.save_mean.span.end(), 0.0f);
  std::fill(a.save_invstd.span.begin(), a.save_invstd.span.end(), 0.0f);
  without_gil([&] {
    normkit::mpi::sync_batch_norm_forward_training(params, a.x.view, a.weight.span, a.bias.span,
                                                   a.y.view, a.save_mean.span,
                                                   a.save_invstd.span, a.running_mean.span,
                                                   a.running_var.span, comm);
  });
  return py::make_tuple(a.y.tensor.value, a.save_mean.value, a.save_invstd.value);
}

py::tuple backward(const py::object& dy, const py::object& x, const OptionalArray& weight,
                   const OptionalArray& save_mean, const OptionalArray& save_invstd,
                   const py::object& comm_in) {
  const char* function = "sync_batch_norm_backward";
  const MPI_Comm comm = comm_of(function, comm_in);
  BatchNormBackwardArgs a = collectively_checked(comm, [&] {
    BatchNormBackwardArgs args = batch_norm_backward_args(function, dy, x, weight);
    batch_norm_saved_statistics(function, args, save_mean, save_invstd);
    return args;
  });
  without_gil([&] {
    normkit::mpi::sync_batch_norm_backward_training({}, a.dy.view, a.x.view, a.save_mean.span,
                                                    a.save_invstd.span, a.weight.span,
                                                    a.dx.view, a.dweight.span, a.dbias.span,
                                                    comm);
  });
  return py::make_tuple(a.dx.tensor.value, or_none(a.dweight), or_none(a.dbias));
}

}  // namespace

PYBIND11_MODULE(_mpi, m) {
  if (import_mpi4py() < 0) throw py::error_already_set();
  m.doc() = "Synchronized BatchNorm over mpi4py communicators (see normkit.mpi).";
  register_error_translator();

  m.def("sync_batch_norm_forward", &forward, py::arg("x"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
        py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, py::arg("comm"),
        R"doc(Training BatchNorm over the global batch formed by every rank's x.

Collective over comm (an mpi4py communicator): every rank calls it, with its own samples
x (N_r, C, *spatial) (N_r may be 0 and may differ between ranks; rank r holds the r-th piece of
the global batch in rank order). Arguments as batch_norm_forward with training=True.
Returns (y, save_mean, save_invstd): this rank's y; the global batch mean and
1 / sqrt(biased var + eps), the same on every rank. Running statistics given are updated in
place with the global batch's statistics (unbiased variance over all ranks' values), the same
on every rank. Every result is bitwise the same for any number of ranks and any split.
An argument error on any rank raises ValueError on every rank.)doc");

  m.def("sync_batch_norm_backward", &backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
        py::arg("save_mean"), py::arg("save_invstd"), py::arg("comm"),
        R"doc(Gradients of sync_batch_norm_forward, collective over comm.

dy, x: this rank's; weight, save_mean, save_invstd as passed to / returned by
sync_batch_norm_forward. Returns (dx, dweight, dbias): this rank's dx; dweight and dbias the
sums over the GLOBAL batch, the same on every rank (torch.nn.SyncBatchNorm returns local parts
for DistributedDataParallel to all-reduce: do not all-reduce these again); None without weight.)doc");

  m.def(
      "reject_call",
      [](const std::string& message, const py::object& comm_in) {
        const MPI_Comm comm = comm_of("reject_call", comm_in);
        normkit::mpi::reject_call(message, comm);
      },
      py::arg("message"), py::arg("comm"),
      R"doc(For wrappers that check arguments of their own before a sync_batch_norm_forward or
_backward call (normkit.torch.SyncBatchNorm does): stands in for that call on a rank whose
arguments were rejected. Collective like the call it replaces: the other ranks' calls raise
ValueError naming this rank and message, and this one raises ValueError(message).)doc");

  m.def(
      "_set_output_poison", [](bool enabled) { g_poison_outputs = enabled; },
      py::arg("enabled"), "Testing aid: fill every output array with NaN before the call.");
}
