"""batch_renorm, batch_renorm_forward and batch_renorm_backward against a float64 torch
composition with r and d detached (autograd for the gradients), batch_norm itself when
r_max = 1 and d_max = 0 and in inference, torch tensors, the fused epilogues and the errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit_testing import (assert_close, check_epilogue_errors, check_fused_epilogue, in_format,
                             n64, raises, t64)


def brn_torch(x64, rm, rv, w64, b64, eps, r_max, d_max, fixed=None):
    """Batch Renorm in float64 torch: (y, r, d), r and d detached (constants of the backward),
    or the given fixed (r, d)."""
    dims = [0] + list(range(2, x64.ndim))
    shape = [1, -1] + [1] * (x64.ndim - 2)
    mean = x64.mean(dims, keepdim=True)
    sigma = torch.sqrt(x64.var(dims, unbiased=False, keepdim=True) + eps)
    sigma_run = torch.sqrt(t64(rv).reshape(shape) + eps)
    r = (sigma / sigma_run).clamp(1 / r_max, r_max).detach()
    d = ((mean - t64(rm).reshape(shape)) / sigma_run).clamp(-d_max, d_max).detach()
    if fixed is not None:
        r, d = fixed
    y = (x64 - mean) / sigma * r + d
    if w64 is not None:
        y = y * w64.reshape(shape)
    if b64 is not None:
        y = y + b64.reshape(shape)
    return y, r.flatten(), d.flatten()


def problem(rng, fmt, spatial, channels=5, batch=3, far=False):
    shape = (batch, channels) + tuple(spatial)
    x = in_format(0.5 + 2.0 * rng.standard_normal(shape), fmt)
    weight = (1.0 + 0.5 * rng.standard_normal(channels)).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    spread = rng.uniform(0.5, 1.5, channels)
    # Running statistics near the batch's, or far from them (r and d then clip).
    rm = (0.5 + (40.0 if far else 0.3) * spread).astype(np.float32)
    rv = (4.0 * (100.0 if far else 1.5) * spread).astype(np.float32)
    return x, weight, bias, rm, rv


@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("spatial", [(), (7,), (5, 3), (2, 3, 3)])
def test_training_matches_torch_float64(rng, spatial, fmt, affine, far):
    x, weight, bias, rm, rv = problem(rng, fmt, spatial, far=far)
    if not affine:
        weight = bias = None
    r_max, d_max, momentum, eps = (1.5, 0.25, 0.05, 1e-5) if far else (3.0, 5.0, 0.01, 1e-5)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd, r, d = normkit.batch_renorm_forward(
        x, rm, rv, weight, bias, True, momentum, eps, r_max, d_max)
    x64 = t64(x).requires_grad_()
    w64 = None if weight is None else t64(weight).requires_grad_()
    b64 = None if bias is None else t64(bias).requires_grad_()
    y_ref, r_ref, d_ref = brn_torch(x64, rm0, rv0, w64, b64, eps, r_max, d_max)
    what = f"shape={x.shape} fmt={fmt} far={far}"
    assert_close(y, n64(y_ref), 1e-5, "y " + what, 1.0)
    assert_close(r, n64(r_ref), 1e-6, "r " + what)
    assert_close(d, n64(d_ref), 1e-6, "d " + what, 1.0)
    if far:
        assert np.all((r == np.float32(1 / r_max)) | (r == np.float32(r_max))), r
        assert np.all(np.abs(d) == np.float32(d_max)), d
    # The running statistics: PyTorch's update, unbiased variance.
    dims = tuple([0] + list(range(2, x.ndim)))
    x_d = x.astype(np.float64)
    assert_close(rm, (1 - momentum) * rm0 + momentum * x_d.mean(dims), 1e-6, "running_mean")
    assert_close(rv, (1 - momentum) * rv0 + momentum * x_d.var(dims, ddof=1), 1e-6, "running_var")
    assert np.array_equal(normkit.batch_renorm(x, rm0.copy(), rv0.copy(), weight, bias, True,
                                               momentum, eps, r_max, d_max), y)

    dy = in_format(rng.standard_normal(x.shape), fmt)
    dx, dweight, dbias = normkit.batch_renorm_backward(dy, x, weight, mean, invstd, r, d)
    y_ref.backward(t64(dy))
    assert_close(dx, n64(x64.grad), 1e-4, "dx " + what, float(np.max(np.abs(dy))))
    if affine:
        assert_close(dweight, n64(w64.grad), 1e-5, "dweight " + what)
        assert_close(dbias, n64(b64.grad), 1e-5, "dbias " + what)
    else:
        assert dweight is None and dbias is None


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_unclippable_is_batch_norm(rng, fmt):
    x, weight, bias, rm, rv = problem(rng, fmt, (6, 5), channels=7, far=True)
    rm_bn, rv_bn = rm.copy(), rv.copy()
    y, mean, invstd, r, d = normkit.batch_renorm_forward(x, rm, rv, weight, bias, True, 0.1,
                                                         1e-5, 1.0, 0.0)
    y_bn, mean_bn, invstd_bn = normkit.batch_norm_forward(x, rm_bn, rv_bn, weight, bias, True,
                                                          0.1, 1e-5)
    assert np.array_equal(r, np.ones(7, np.float32)) and np.array_equal(d, np.zeros(7, np.float32))
    assert np.array_equal(mean, mean_bn) and np.array_equal(invstd, invstd_bn)
    assert np.array_equal(rm, rm_bn) and np.array_equal(rv, rv_bn)
    assert_close(y, y_bn, 4e-6, "y", 1.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for a, b in zip(normkit.batch_renorm_backward(dy, x, weight, mean, invstd, r, d),
                    normkit.batch_norm_backward(dy, x, weight, mean, invstd)):
        assert np.array_equal(a, b)


def test_inference_is_batch_norm_inference(rng):
    x, weight, bias, rm, rv = problem(rng, "channels_last", (4, 3))
    y = normkit.batch_renorm(x, rm, rv, weight, bias)
    assert np.array_equal(y, normkit.batch_norm(x, rm, rv, weight, bias))
    y_ref = F.batch_norm(t64(x), t64(rm), t64(rv), t64(weight), t64(bias), False, 0.0, 1e-5)
    assert_close(y, n64(y_ref), 1e-5, "y", 1.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    got = normkit.batch_renorm_backward(dy, x, weight, None, None, None, None, False, rm, rv)
    want = normkit.batch_norm_backward(dy, x, weight, None, None, False, rm, rv)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def test_torch_tensors(rng):
    x, weight, bias, rm, rv = problem(rng, "channels_last", (4, 4))
    xt = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=torch.channels_last)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y_t = normkit.batch_renorm(xt, rm_t, rv_t, torch.from_numpy(weight), torch.from_numpy(bias),
                               training=True)
    y = normkit.batch_renorm(x, rm, rv, weight, bias, training=True)
    assert isinstance(y_t, torch.Tensor)
    assert np.array_equal(y_t.numpy(), y)
    assert np.array_equal(rm_t.numpy(), rm) and np.array_equal(rv_t.numpy(), rv)


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_fused_epilogues(rng, fmt):
    x, weight, bias, rm, rv = problem(rng, fmt, (5, 3), channels=6)
    # Every call sees the same running statistics (the forward updates its copies).
    def forward(x, w, b, **kw):
        return normkit.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b, True, 0.01, 1e-5,
                                            1.2, 0.1, **kw)

    def backward(dy, x, saved, w, **kw):
        return normkit.batch_renorm_backward(dy, x, w, *saved, **kw)

    # r and d of x itself, held for every input: the finite differences of the check then see
    # the stop-gradient function whose gradient the backward computes.
    _, r, d = brn_torch(t64(x), rm, rv, None, None, 1e-5, 1.2, 0.1)
    shape = [1, -1] + [1] * (x.ndim - 2)
    fixed = (r.reshape(shape), d.reshape(shape))
    check_fused_epilogue(
        rng, x, weight, bias, forward, backward,
        lambda x64, w64, b64: brn_torch(x64, rm, rv, w64, b64, 1e-5, 1.2, 0.1, fixed)[0],
        1e-5, f"fmt={fmt}")


def test_errors(rng):
    x, weight, bias, rm, rv = problem(rng, "channels_first", (3,))
    rm0, rv0 = rm.copy(), rv.copy()
    for kw, fragments in [(dict(r_max=0.5), ("r_max", "0.5")), (dict(d_max=-1.0), ("d_max", "-1")),
                          (dict(momentum=1.5), ("momentum", "1.5")), (dict(eps=0.0), ("eps", "0")),
                          (dict(r_max=float("nan")), ("r_max", "nan"))]:
        with raises(ValueError, "batch_renorm", *fragments):
            normkit.batch_renorm(x, rm, rv, weight, bias, training=True, **kw)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)
    with raises(ValueError, "running_mean"):
        normkit.batch_renorm(x, None, None, weight, bias, training=True)
    with raises(ValueError, "weight", "4", "5"):
        normkit.batch_renorm(x, rm, rv, weight[:4], bias, training=True)
    y, *saved = normkit.batch_renorm_forward(x, rm, rv, weight, bias, training=True)
    with raises(ValueError, "save_r", "4", "5"):
        normkit.batch_renorm_backward(y, x, weight, saved[0], saved[1], saved[2][:4], saved[3])
    with raises(ValueError, "save_r"):
        normkit.batch_renorm_backward(y, x, weight, saved[0], saved[1], None, saved[3])
    check_epilogue_errors(
        x, lambda x, **kw: normkit.batch_renorm_forward(x, rm.copy(), rv.copy(), training=True,
                                                        **kw),
        lambda dy, x, saved, **kw: normkit.batch_renorm_backward(dy, x, None, *saved, **kw))
