"""Shared helpers of the Python tests: inputs in each memory format, the float64 torch oracle's
conversions, and the error measure the tolerances are stated in."""

import re

import numpy as np
import pytest
import torch

# How an activation array is laid out in memory.
#   channels_first: C-contiguous (N, C, *spatial)
#   channels_last:  the strides of a torch channels-last tensor (NLC, NHWC, NDHWC memory)
#   strided:        neither (every other float of a buffer): the module must copy it
FORMATS = ("channels_first", "channels_last", "strided")


def dense_strides(shape, order, itemsize=4):
    """Byte strides of a dense array whose dims are laid out in `order`, outermost first."""
    strides = [0] * len(shape)
    step = itemsize
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def channels_last_strides(shape, itemsize=4):
    rank = len(shape)
    return dense_strides(shape, [0, *range(2, rank), 1], itemsize)


def is_channels_last(a):
    return a.ndim >= 3 and a.strides == channels_last_strides(a.shape, a.itemsize)


def is_channels_first(a):
    return a.strides == dense_strides(a.shape, list(range(a.ndim)), a.itemsize)


def in_format(a, fmt):
    """A float32 array with a's values laid out as `fmt`."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if fmt == "channels_first" or (fmt == "channels_last" and a.ndim < 3):
        return a
    if fmt == "channels_last":
        # Channels-last memory (N, *spatial, C), viewed in logical order. Built in NumPy so that
        # unit dims get the canonical strides too (torch keeps a C == 1 tensor's strides).
        memory = np.moveaxis(a, 1, -1).copy(order="C")
        out = np.moveaxis(memory, -1, 1)
        assert is_channels_last(out), (out.shape, out.strides)
        return out
    if fmt == "strided":
        # Every other float of a buffer: dense in no format unless every dim is 1.
        out = np.zeros(a.shape + (2,), np.float32)[..., 0]
        out[...] = a
        assert a.size <= 1 or not (is_channels_first(out) or is_channels_last(out))
        return out
    raise ValueError(fmt)


def t64(a):
    """The float64 torch tensor holding exactly a's float32 values (contiguous: torch's float64
    channels-first kernels are the accurate ones)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def n64(t):
    return t.detach().numpy()


def tolerance(offset, scale):
    """Forward tolerance relative to max|y| for inputs offset + scale * randn."""
    return 1e-5 * (1.0 + abs(offset) / scale)


def _check_array(actual, expected, what):
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual)}"
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values (unwritten outputs are NaN)"


def assert_close(actual, expected, tol, what, magnitude=0.0):
    """max |actual - expected| <= tol * max(max |expected|, magnitude), plus shape, dtype and
    finiteness. `magnitude`: the size of terms that cancel in the result, where that is larger
    (dx of a two-value group is ~0: only float32 rounding of its terms remains)."""
    expected = np.asarray(expected, dtype=np.float64)
    _check_array(actual, expected, what)
    if expected.size == 0:
        return
    magnitude = max(float(np.max(np.abs(expected))), magnitude)
    error = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert error <= tol * max(magnitude, 1e-30), \
        f"{what}: max error {error:.3g} > {tol:.3g} * max|expected| {magnitude:.3g}"


def assert_normalized_close(actual, expected, x, mean, rstd, weight, what):
    """A forward output y = (x - mean) * rstd * weight + bias against its float64 value.

    Each element may be off by 1e-5 * max|y| plus 1e-5 * (|x| + |mean|) * rstd * |weight|: x - mean
    cannot be formed in float32 more exactly than the size of x and mean allows. Per group, this
    is what the criterion 1e-5 * (1 + |offset| / scale) * max|y| says per tensor; per group it
    also holds where a few values happen to lie close together (a large offset relative to
    their own spread). mean, rstd and weight broadcast against x (weight may be None)."""
    expected = np.asarray(expected, dtype=np.float64)
    _check_array(actual, expected, what)
    if expected.size == 0:
        return
    x = np.asarray(x, np.float64)
    w = 1.0 if weight is None else np.abs(weight)
    allowance = 1e-5 * (np.max(np.abs(expected)) + (np.abs(x) + np.abs(mean)) * rstd * w)
    error = np.abs(actual.astype(np.float64) - expected)
    worst = np.unravel_index(np.argmax(error - allowance), error.shape)
    assert np.all(error <= allowance), \
        f"{what}: error {error[worst]:.3g} > allowed {allowance[worst]:.3g} at {worst}"


def assert_same_layout(out, x_format, like):
    """The output kept the input's format: channels-last in, the same strides out; anything
    else in, C-contiguous out."""
    if x_format == "channels_last" and like.ndim >= 3:
        assert out.strides == like.strides, f"strides {out.strides} != input's {like.strides}"
        assert is_channels_last(out)
    else:
        assert is_channels_first(out), f"strides {out.strides} of shape {out.shape}"


def per_channel(v, ndim):
    """A length-C vector shaped to broadcast against (N, C, *spatial)."""
    return np.asarray(v, np.float64).reshape(1, -1, *([1] * (ndim - 2)))


def per_sample_channel(v, ndim):
    """(N, C) values shaped to broadcast against (N, C, *spatial)."""
    v = np.asarray(v, np.float64)
    return v.reshape(*v.shape[:2], *([1] * (ndim - 2)))


def moments(x, axes, eps):
    """float64 mean and 1 / sqrt(biased var + eps) over `axes`, kept for broadcasting."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    return mean, 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


def gradient_term_magnitude(dy, weight, rstd):
    """max |dy * weight * rstd|: the size of each term of dx in the normalization backward.
    rstd broadcasts against dy (per channel, or per (n, c))."""
    w = 1.0 if weight is None else per_channel(weight, dy.ndim)
    return float(np.max(np.abs(dy.astype(np.float64) * w * rstd), initial=0.0))


def raises(exception, *fragments):
    """pytest.raises that also wants each fragment (case-insensitive) in the message."""
    pattern = "".join(f"(?=.*{re.escape(str(f))})" for f in fragments)
    return pytest.raises(exception, match=re.compile(pattern, re.IGNORECASE | re.DOTALL))


class Config:
    """A random activation: shape, value distribution and layout."""

    def __init__(self, rng, channels, spatial_dims, fmt, batch=None, spatial=None):
        self.rng = rng
        self.batch = batch if batch is not None else int(rng.choice([1, 1, 2, 3, 5]))
        if spatial is None:
            spatial = [int(rng.choice([1, 2, 3, 5, 7])) for _ in range(spatial_dims)]
        self.shape = (self.batch, channels, *spatial)
        self.format = fmt
        self.scale = float(rng.choice([1e-3, 1.0, 30.0]))
        self.offset = float(rng.choice([0.0, 1.0, -100.0, 3e4])) * self.scale
        self.eps = float(rng.choice([1e-5, 1e-3]))

    @property
    def spatial_size(self):
        return int(np.prod(self.shape[2:], dtype=np.int64))

    def activation(self):
        values = self.offset + self.scale * self.rng.standard_normal(self.shape)
        return in_format(values, self.format)

    def gradient(self):
        """A random upstream gradient, in a layout of its own (the module matches it to x's)."""
        fmt = FORMATS[self.rng.integers(len(FORMATS))]
        return in_format(self.rng.standard_normal(self.shape), fmt)

    def vector(self, n, mean=0.0, spread=1.0):
        return (mean + spread * self.rng.standard_normal(n)).astype(np.float32)

    def tol(self):
        return tolerance(self.offset, self.scale)

    @property
    def value_size(self):
        """The size of x's values: the yardstick for a mean, which may itself be near 0."""
        return abs(self.offset) + self.scale

    def __repr__(self):
        return (f"shape={self.shape} format={self.format} offset={self.offset:g} "
                f"scale={self.scale:g} eps={self.eps:g}")


def finite_difference_check(forward64, x, dy, dx, tol, what, directions=3, rng=None):
    """dx = d/dx sum(dy * forward64(x)) along random directions v: <dx, v> against the central
    difference of the float64 forward (an implementation independent of torch and of the
    module), relative to |dx| * |v|."""
    rng = rng if rng is not None else np.random.default_rng(0)
    x64 = np.asarray(x, np.float64)
    dy64 = np.asarray(dy, np.float64)
    dx64 = np.asarray(dx, np.float64)
    scale = max(float(np.max(np.abs(x64 - x64.mean()), initial=0.0)), 1e-30)
    h = 1e-5 * scale
    for _ in range(directions):
        v = rng.standard_normal(x64.shape)
        loss = lambda t: float(np.sum(dy64 * forward64(x64 + t * v)))  # noqa: E731
        numeric = (loss(h) - loss(-h)) / (2 * h)
        analytic = float(np.sum(dx64 * v))
        yardstick = float(np.linalg.norm(dx64) * np.linalg.norm(v)) + 1e-30
        assert abs(numeric - analytic) <= tol * yardstick, \
            f"{what}: <dx, v> = {analytic:.6g}, finite difference {numeric:.6g}"


def laid_out_like(out, values):
    """An array with `out`'s shape, dtype and strides (a dense output of the module), holding
    `values`: what an epilogue tensor must look like."""
    buffer = np.empty(max(out.size, 1), out.dtype)
    a = np.ndarray(out.shape, out.dtype, buffer=buffer, strides=out.strides)
    a[...] = values
    return a


EPILOGUES = [(None, False), ("relu", False), ("silu", False),
             (None, True), ("relu", True), ("silu", True)]


def check_fused_epilogue(rng, x, weight, bias, forward, backward, reference, tol, what):
    """Every epilogue of an op against torch in float64.

    forward(x, weight, bias, **epilogue) -> (y, *saved); backward(dy, x, saved, weight,
    **epilogue) -> (dx, dweight, dbias[, dresidual]); reference(x64, w64, b64) -> the float64
    torch tensor of the plain normalization. The reference's epilogue is applied in torch, and
    its gradients come from autograd with relu's mask taken from the module's y (a value within
    rounding of 0 may fall either side); silu's come from autograd through torch's silu, and
    its backward is given the forward's residual and bias (None where it had none)."""
    plain = forward(x, weight, bias)[0]
    residual = laid_out_like(plain, rng.standard_normal(x.shape))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for activation, with_residual in EPILOGUES:
        case = f"{what} activation={activation} residual={with_residual}"
        res = residual if with_residual else None
        y, *saved = forward(x, weight, bias, activation=activation, residual=res)
        assert y.strides == plain.strides, case
        x64 = t64(x).requires_grad_()
        w64 = None if weight is None else t64(weight).requires_grad_()
        b64 = None if bias is None else t64(bias).requires_grad_()
        r64 = t64(residual).requires_grad_()
        pre = reference(x64, w64, b64)
        if with_residual:
            pre = pre + r64
        if activation == "relu":
            y_ref = torch.relu(pre)
        elif activation == "silu":
            y_ref = torch.nn.functional.silu(pre)
        else:
            y_ref = pre
        assert_close(y, n64(y_ref), tol, "y " + case, 1.0)

        kw = {}
        if activation == "silu":
            kw = dict(residual=res, bias=bias)
        grads = backward(dy, x, saved, weight, activation=activation,
                         y=y if activation == "relu" else None, residual_grad=with_residual,
                         **kw)
        assert len(grads) == (4 if with_residual else 3), case
        if activation == "relu":
            g = dy.astype(np.float64) * (y > 0)
        elif activation == "silu":
            pre_leaf = pre.detach().requires_grad_()
            torch.nn.functional.silu(pre_leaf).backward(t64(dy))
            g = n64(pre_leaf.grad)
        else:
            g = dy
        pre.backward(t64(g))
        dx, dweight, dbias = grads[:3]
        assert_close(dx, n64(x64.grad), 20 * tol, "dx " + case, float(np.max(np.abs(g))))
        # silu's z is recomputed in the backward: also against torch-free slopes, where dx is not
        # mostly cancellation (tiny groups: float32 rounding of g's terms, checked above).
        if activation == "silu" and np.linalg.norm(dx) >= 0.1 * np.linalg.norm(g):
            def forward64(x_values, w64=w64, b64=b64, r64=r64, with_residual=with_residual):
                with torch.no_grad():
                    z = reference(torch.from_numpy(x_values), w64, b64)
                    return n64(torch.nn.functional.silu(z + r64 if with_residual else z))
            finite_difference_check(forward64, x, dy, dx, 20 * tol, "dx " + case, rng=rng)
        assert dx.strides == plain.strides, case
        if weight is not None:
            # A one-value group has x_hat ~ 0: dweight is then float64 rounding against 0.
            g_max = float(np.max(np.abs(g), initial=0.0))
            assert_close(dweight, n64(w64.grad), 20 * tol, "dweight " + case, g_max)
            assert_close(dbias, n64(b64.grad), 20 * tol, "dbias " + case, g_max)
        if with_residual:
            dresidual = grads[3]
            assert dresidual.strides == plain.strides, case
            if activation == "silu":  # z is recomputed in float32: g within rounding
                assert_close(dresidual, g, 20 * tol, "dresidual " + case, 1.0)
            else:
                assert np.array_equal(dresidual, g.astype(np.float32)), "dresidual " + case


def check_epilogue_errors(x, forward, backward):
    """The epilogue arguments' errors, raised before anything runs. forward(x, **epilogue) ->
    (y, *saved); backward(dy, x, saved, **epilogue)."""
    y, *saved = forward(x)
    dy = np.ones_like(y)
    for bad, exception, fragments in [
            ("gelu", ValueError, ("activation", "None", "'relu'", "'silu'", "'gelu'")),
            ("ReLU", ValueError, ("activation", "'relu'", "'ReLU'")),
            (1, TypeError, ("activation", "'relu'", "1"))]:
        with raises(exception, *fragments):
            forward(x, activation=bad)
        with raises(exception, *fragments):
            backward(dy, x, saved, activation=bad, y=y)
    wrong_shape = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), np.float32)
    with raises(ValueError, "residual", "shape", str(wrong_shape.shape)):
        forward(x, residual=wrong_shape)
    with raises(TypeError, "residual", "dtype", "float16", "float32"):
        forward(x, residual=np.zeros_like(y, dtype=np.float16))
    with raises(TypeError, "residual", "float64"):
        forward(x, residual=np.zeros_like(y, dtype=np.float64))
    if is_channels_last(y):
        other = np.zeros(y.shape, np.float32)  # channels-first: unlike x's channels-last
    else:
        other = np.zeros(y.shape + (2,), np.float32)[..., 0]  # strided
    with raises(ValueError, "residual", "laid out as x", "strides"):
        forward(x, residual=other)
    with raises(ValueError, "y", "required", "relu"):
        backward(dy, x, saved, activation="relu")
    with raises(ValueError, "y", "activation=None"):
        backward(dy, x, saved, y=y)
    with raises(ValueError, "y", "laid out as x"):
        backward(dy, x, saved, activation="relu", y=other)
    with raises(ValueError, "y", "shape"):
        backward(dy, x, saved, activation="relu", y=wrong_shape)
    # silu recomputes z from the forward's residual and bias: a forgotten one would be
    # indistinguishable from an absent one, so both must be passed (None: the forward had none).
    with raises(ValueError, "residual", "required", "silu", "None"):
        backward(dy, x, saved, activation="silu", bias=None)
    with raises(ValueError, "bias", "required", "silu", "None"):
        backward(dy, x, saved, activation="silu", residual=None)
    with raises(ValueError, "y", "activation='silu'"):
        backward(dy, x, saved, activation="silu", residual=None, bias=None, y=y)
    for activation in [None, "relu"]:
        extra = dict(y=y) if activation == "relu" else {}
        with raises(ValueError, "residual", "not read", f"activation={activation!r}"):
            backward(dy, x, saved, activation=activation, residual=y, **extra)
        with raises(ValueError, "bias", "not read", f"activation={activation!r}"):
            backward(dy, x, saved, activation=activation, bias=np.zeros(1, np.float32), **extra)
        # None states the forward had none: harmless without silu.
        backward(dy, x, saved, activation=activation, residual=None, bias=None, **extra)
    with raises(ValueError, "residual", "shape"):
        backward(dy, x, saved, activation="silu", residual=wrong_shape, bias=None)
    with raises(ValueError, "bias"):
        backward(dy, x, saved, activation="silu", residual=None, bias=np.zeros(1, np.float32))
    with raises(ValueError, "residual", "laid out as x"):
        backward(dy, x, saved, activation="silu", residual=other, bias=None)
    with raises(TypeError, "residual", "dtype"):
        backward(dy, x, saved, activation="silu", residual=np.zeros_like(y, dtype=np.float16),
                 bias=None)
