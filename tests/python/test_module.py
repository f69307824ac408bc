"""What the module does around the kernels: memory formats of torch-made arrays, copies of
unusual arrays, threads, documentation."""

import sys
import threading

import numpy as np
import pytest
import torch

import normkit
from normkit_testing import (assert_close, is_channels_first, is_channels_last, n64, raises,
                             t64)

PUBLIC = ["DLPackTensor", "group_norm", "group_norm_forward", "group_norm_backward", "batch_norm",
          "batch_norm_forward", "batch_norm_backward", "instance_norm", "instance_norm_forward",
          "instance_norm_backward", "layer_norm", "layer_norm_forward", "layer_norm_backward",
          "set_num_threads", "get_num_threads"]

TORCH_LAYOUTS = [
    ((2, 6, 5, 3), torch.channels_last),
    ((3, 4, 1, 1), torch.channels_last),    # strides of unit dims are torch's own
    ((2, 1, 5, 3), torch.channels_last),    # C == 1: torch keeps channels-first strides
    ((1, 6, 3, 1), torch.channels_last),
    ((2, 6, 3, 2, 5), torch.channels_last_3d),
    ((1, 2, 1, 3, 1), torch.channels_last_3d),
]


@pytest.mark.parametrize("shape,memory_format", TORCH_LAYOUTS)
def test_torch_channels_last_arrays_keep_their_strides(rng, shape, memory_format):
    """torch's channels-last tensors, seen through .numpy(), are computed without a copy in
    the format their strides say, and the outputs have exactly their strides."""
    values = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    x = values.contiguous(memory_format=memory_format).numpy()
    dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).contiguous(
        memory_format=memory_format).numpy()
    groups = 2 if shape[1] % 2 == 0 else 1

    y, mean, rstd = normkit.group_norm_forward(x, groups)
    dx, _, _ = normkit.group_norm_backward(dy, x, mean, rstd, groups)
    y_bn, _, _ = normkit.batch_norm_forward(x, None, None, training=True)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    y_in = normkit.instance_norm(x, rm, rv, use_input_stats=False)
    for name, out in [("y", y), ("dx", dx), ("batch_norm", y_bn), ("instance_norm", y_in)]:
        assert out.strides == x.strides, f"{name}: strides {out.strides} != x's {x.strides}"
    y_ref = torch.nn.functional.group_norm(t64(x), groups)
    assert_close(y, n64(y_ref), 1e-5, "group_norm")
    if shape[1] > 1 and any(d > 1 for d in shape[2:]):
        assert is_channels_last(y) and not is_channels_first(y)


def test_unaligned_and_readonly_inputs(rng):
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    buffer = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = np.frombuffer(buffer.data, np.float32, x.size, offset=1).reshape(x.shape)
    assert not unaligned.flags.aligned
    buffer[1:] = x.view(np.uint8).reshape(-1)
    readonly = x.copy()
    readonly.setflags(write=False)
    expected = normkit.group_norm(x, 2)
    assert np.array_equal(normkit.group_norm(unaligned, 2), expected)
    assert np.array_equal(normkit.group_norm(readonly, 2), expected)
    weight = np.frombuffer(buffer.data, np.float32, 4, offset=1)
    assert np.array_equal(normkit.group_norm(x, 2, weight), normkit.group_norm(x, 2, weight.copy()))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_outputs_are_64_byte_aligned(rng, channels_last, dtype):
    """NumPy allocates with 16-byte alignment; normkit's NumPy outputs start on a 64-byte boundary
    (the kernels stream large channels-last outputs only from aligned rows), are writeable
    and dense, and keep their buffer alive after the call."""
    x = rng.standard_normal((2, 16, 5, 3)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y, mean, rstd = normkit.group_norm_forward(x, 4)
    dx, _, _ = normkit.group_norm_backward(dy, x, mean, rstd, 4)
    y_ln = normkit.layer_norm(x, (3,))
    for name, out in [("y", y), ("dx", dx), ("layer_norm", y_ln)]:
        assert out.ctypes.data % 64 == 0, f"{name} at {out.ctypes.data % 64} bytes past 64"
        assert out.flags.writeable and out.dtype == dtype, name
    assert y.strides == x.strides and dx.strides == x.strides
    expected = normkit.group_norm(x.copy(order="K"), 4)
    del dx, y_ln
    assert np.array_equal(y, expected)  # still valid with the other outputs freed
    y[...] = 0
    assert not y.any()


def test_outputs_are_new_arrays(rng):
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    y, mean, rstd = normkit.group_norm_forward(x, 2)
    dx, dweight, dbias = normkit.group_norm_backward(x, x, mean, rstd, 2, np.ones(4, np.float32))
    arrays = [x, y, mean, rstd, dx, dweight, dbias]
    for i, a in enumerate(arrays):
        assert a.flags.writeable
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)


def test_results_do_not_depend_on_the_thread_count(rng):
    x = (100 + rng.standard_normal((3, 32, 17, 19))).astype(np.float32)
    x_last = np.moveaxis(np.moveaxis(x, 1, -1).copy(), -1, 1)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(32).astype(np.float32)
    initial = normkit.get_num_threads()

    def everything():
        out = []
        for a in (x, x_last):
            y, mean, rstd = normkit.group_norm_forward(a, 8, w, w)
            out += [y, mean, rstd, *normkit.group_norm_backward(dy, a, mean, rstd, 8, w)]
            rm, rv = np.zeros(32, np.float32), np.ones(32, np.float32)
            y, save_mean, save_invstd = normkit.batch_norm_forward(a, rm, rv, w, w, True)
            out += [y, rm, rv, *normkit.batch_norm_backward(dy, a, w, save_mean, save_invstd)]
            out += [normkit.instance_norm(a, weight=w), normkit.layer_norm(a, a.shape[1:])]
        return out

    try:
        results = []
        for threads in (1, 2, 3):
            normkit.set_num_threads(threads)
            assert normkit.get_num_threads() == threads
            results.append(everything())
    finally:
        normkit.set_num_threads(initial)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_thread_count_bad_values():
    initial = normkit.get_num_threads()
    assert initial >= 1
    for bad in (0, -3):
        with raises(ValueError, "set_num_threads", str(bad)):
            normkit.set_num_threads(bad)
    assert normkit.get_num_threads() == initial


def test_concurrent_calls_from_python_threads(rng):
    """The GIL is released around kernels; calls from several threads stay independent."""
    inputs = [rng.standard_normal((2, 8, 33, 31)).astype(np.float32) for _ in range(4)]
    expected = [normkit.group_norm(x, 4) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = normkit.group_norm(inputs[i], 4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_every_function_is_documented():
    assert normkit.__doc__ and "channels-last" in normkit.__doc__
    for name in PUBLIC:
        doc = getattr(normkit, name).__doc__
        # pybind11 puts the signature first; the description follows it.
        assert doc and len(doc.split("\n", 1)[-1].strip()) > 40, name


def test_signatures_follow_torch():
    """Keyword names and defaults are torch.nn.functional's."""
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    w = np.ones(4, np.float32)
    a = normkit.group_norm(x, num_groups=2, weight=w, bias=w, eps=1e-3)
    assert np.array_equal(a, normkit.group_norm(x, 2, w, w, 1e-3))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    a = normkit.batch_norm(x, running_mean=rm, running_var=rv, weight=w, bias=w, training=False,
                           momentum=0.1, eps=1e-5)
    assert np.array_equal(a, normkit.batch_norm(x, rm, rv, w, w))
    a = normkit.instance_norm(x, running_mean=None, running_var=None, weight=w, bias=w,
                              use_input_stats=True, momentum=0.1, eps=1e-5)
    assert np.array_equal(a, normkit.instance_norm(x, None, None, w, w))
    a = normkit.layer_norm(x, normalized_shape=[3], weight=None, bias=None, eps=1e-5)
    assert np.array_equal(a, normkit.layer_norm(x, 3))


def test_epilogue_arguments_are_keyword_only(rng):
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    with pytest.raises(TypeError):
        normkit.group_norm_forward(x, 2, None, None, 1e-5, "relu")
    y, mean, rstd = normkit.group_norm_forward(x, 2, activation="relu")
    with pytest.raises(TypeError):
        normkit.group_norm_backward(x, x, mean, rstd, 2, None, "relu", y)
    # Epilogue tensors are only read: read-only arrays are fine.
    residual = rng.standard_normal(x.shape).astype(np.float32)
    residual.setflags(write=False)
    y.setflags(write=False)
    normkit.group_norm_forward(x, 2, residual=residual)
    normkit.group_norm_backward(x, x, mean, rstd, 2, activation="relu", y=y, residual_grad=True)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_call_runs_no_python_code(rng, kind):
    """The per-call overhead stays in C: a successful call on NumPy or torch tensors enters no
    Python function (NumPy's dtype name, torch's from_dlpack wrapper would cost as much as the
    rest of a small call; docs/python.md has the measurements)."""
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    w = np.ones(6, np.float32)
    if kind == "torch":
        x, w = torch.from_numpy(x), torch.from_numpy(w)
    normkit.group_norm_forward(x, 3, w, w)  # first calls resolve what they cache
    entered = []

    def profile(frame, event, arg):
        if event == "call":
            entered.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        y, mean, rstd = normkit.group_norm_forward(x, 3, w, w, activation="relu")
        normkit.group_norm_backward(y, x, mean, rstd, 3, w, activation="relu", y=y,
                                    residual_grad=True)
    finally:
        sys.setprofile(None)
    assert entered == []


def test_numpy_2_refused_with_a_pybind11_that_predates_it():
    # The extension reports the pybind11 it was built with; the import check refuses NumPy 2 with
    # a pybind11 older than 2.12 (which reads NumPy 2's arrays with NumPy 1's layout), by name.
    major, minor = normkit._normkit._pybind11_version
    assert (major, minor) >= (2, 6)
    with pytest.raises(ImportError, match=r"pybind11 2\.10.*NumPy 2\.0\.1.*2\.12"):
        normkit._check_numpy_support((2, 10), "2.0.1")
    with pytest.raises(ImportError, match=r"pybind11 2\.11"):
        normkit._check_numpy_support((2, 11), "2.4.6")
    normkit._check_numpy_support((2, 12), "2.0.1")
    normkit._check_numpy_support((3, 0), "2.4.6")
    normkit._check_numpy_support((2, 10), "1.24.2")
    normkit._check_numpy_support((2, 10), "1.26.4")
