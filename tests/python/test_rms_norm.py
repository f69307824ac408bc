"""rms_norm, rms_norm_forward and rms_norm_backward against a float64 NumPy reference, torch in
float64 (rms_norm composed from torch ops; torch.nn.functional.rms_norm too where it exists) and
finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit_testing import (assert_close, finite_difference_check, in_format,
                             is_channels_first, is_channels_last, laid_out_like, n64, raises,
                             t64)

EPS32 = float(np.finfo(np.float32).eps)


def rms64(x, normalized_ndim, weight=None, eps=EPS32):
    """float64 NumPy reference: (y, rstd) with rstd kept for broadcasting."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    rstd = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    y = x * rstd
    return (y if weight is None else y * np.asarray(weight, np.float64)), rstd


def rms_torch(x64, normalized, w64, eps):
    """torch's rms_norm composed in float64 (torch 1.13 has none)."""
    dims = tuple(range(-len(normalized), 0))
    y = x64 * torch.rsqrt(x64.pow(2).mean(dims, keepdim=True) + eps)
    return y if w64 is None else y * w64


def random_problem(rng, rank, fmt):
    normalized_ndim = int(rng.integers(1, rank + 1))
    if fmt == "channels_last" and rng.random() < 0.5:
        normalized_ndim = rank - 1  # the case computed channels-last (up to rank 5)
    shape = tuple(int(rng.choice([1, 2, 3, 5, 7])) for _ in range(rank))
    normalized = shape[rank - normalized_ndim:]
    scale = float(rng.choice([1e-3, 1.0, 30.0]))
    offset = float(rng.choice([0.0, 1.0, -100.0, 3e4])) * scale
    x = in_format(offset + scale * rng.standard_normal(shape), fmt)
    return x, normalized


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5, 6])
def test_forward_and_backward_match_float64(rng, rank, fmt, affine, seed):
    if fmt == "channels_last" and rank < 3:
        pytest.skip("no channels-last below rank 3")
    x, normalized = random_problem(rng, rank, fmt)
    weight = (1.0 + 0.5 * rng.standard_normal(normalized)).astype(np.float32) if affine else None
    eps = [None, 1e-5][seed]
    e = EPS32 if eps is None else eps
    dy = in_format(rng.standard_normal(x.shape), ["channels_first", "strided"][seed])
    # An int, a tuple or a list, as torch accepts.
    arg = normalized[0] if len(normalized) == 1 and seed == 0 else list(normalized)

    y, rstd = normkit.rms_norm_forward(x, arg, weight, eps)
    assert np.array_equal(y, normkit.rms_norm(x, arg, weight, eps))
    y_np, rstd_np = rms64(x, len(normalized), weight, e)
    x64 = t64(x).requires_grad_()
    w64 = t64(weight).requires_grad_() if affine else None
    y_ref = rms_torch(x64, normalized, w64, e)
    what = f"shape={x.shape} normalized={normalized} eps={eps}"
    # No mean is subtracted: float32 rounding relative to |y|, whatever the offset.
    assert_close(y, y_np, 1e-5, "y " + what)
    assert_close(y, n64(y_ref), 1e-5, "y vs torch " + what)
    assert rstd.shape == rstd_np.shape, what
    assert_close(rstd, rstd_np, 1e-6, "rstd " + what)
    layout_last = fmt == "channels_last" and len(normalized) == x.ndim - 1 and x.ndim <= 5
    assert is_channels_last(y) if layout_last else is_channels_first(y), (y.shape, y.strides)

    dx, dweight = normkit.rms_norm_backward(dy, x, normalized, rstd, weight)
    y_ref.backward(t64(dy))
    w = 1.0 if weight is None else np.abs(weight)
    terms = float(np.max(np.abs(dy) * w * rstd_np))
    assert_close(dx, n64(x64.grad), 2e-4, "dx " + what, terms)
    assert is_channels_last(dx) if layout_last else is_channels_first(dx)
    if affine:
        assert dweight.shape == normalized
        assert_close(dweight, n64(w64.grad), 2e-4, "dweight " + what,
                     float(np.sum(np.abs(dy) * np.abs(y_np))))
    else:
        assert dweight is None


@pytest.mark.skipif(not hasattr(F, "rms_norm"), reason="torch has no rms_norm")
def test_matches_torch_rms_norm(rng):
    x = rng.standard_normal((3, 5, 17)).astype(np.float32)
    w = rng.standard_normal((5, 17)).astype(np.float32)
    for eps in [None, 1e-6]:
        want = F.rms_norm(t64(x), (5, 17), t64(w), EPS32 if eps is None else eps)
        assert_close(normkit.rms_norm(x, (5, 17), w, eps), n64(want), 1e-5, f"eps={eps}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_tensors_of_every_dtype(rng, dtype):
    """torch in, torch out, of x's dtype; eps=None is torch.finfo(dtype).eps. The result is the
    float64 value of the same (rounded) inputs, rounded once to the dtype."""
    x = torch.from_numpy(rng.standard_normal((37, 2, 129)) * 3 + 1).to(dtype)
    w = torch.from_numpy(rng.standard_normal(129).astype(np.float32))
    y = normkit.rms_norm(x, 129, w)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape
    eps = torch.finfo(dtype).eps
    want = rms_torch(x.double(), (129,), w.double(), eps)
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    err = (y.double() - want).abs()
    assert bool((err <= ulp * want.abs() + 1e-5 * (1 + float(want.abs().max()))).all())
    # eps=None differs from a small explicit eps where it matters: a row of zeros and tiny values.
    z = torch.zeros(1, 4, dtype=dtype)
    z[0, 0] = 1e-3
    assert normkit.rms_norm(z, 4)[0, 0].item() == pytest.approx(
        float(rms_torch(z.double(), (4,), None, eps)[0, 0]), rel=1e-2)

    dy = torch.from_numpy(rng.standard_normal(x.shape)).to(dtype)
    y2, rstd = normkit.rms_norm_forward(x, 129, w)
    assert torch.equal(y, y2) and rstd.dtype == torch.float32
    dx, dw = normkit.rms_norm_backward(dy, x, 129, rstd, w)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    rms_torch(x64, (129,), w64, eps).backward(dy.double())
    terms = float((dy.double().abs() * w64.detach().abs() * rstd.double()).max())
    assert float((dx.double() - x64.grad).abs().max()) <= 4 * ulp * terms + 1e-5 * terms
    assert float((dw.double() - w64.grad).abs().max()) <= 1e-3 * float(w64.grad.abs().max())


@pytest.mark.parametrize("case", [((3, 7), 1), ((2, 5, 3), 2), ((2, 3, 5, 3), 3), ((9, 2), 1),
                                  ((1, 2, 3, 2, 3, 2), 4)])
def test_backward_matches_finite_differences(rng, case):
    shape, normalized_ndim = case
    normalized = shape[len(shape) - normalized_ndim:]
    x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = (1.0 + 0.5 * rng.standard_normal(normalized)).astype(np.float32)
    _, rstd = normkit.rms_norm_forward(x, normalized, weight, 1e-5)
    dx, _ = normkit.rms_norm_backward(dy, x, normalized, rstd, weight)
    finite_difference_check(lambda v: rms64(v, normalized_ndim, weight, 1e-5)[0], x, dy, dx,
                            1e-4, f"shape={shape}", rng=rng)


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_fused_residual_add(rng, fmt):
    """h = x + residual_in is returned and normalized; the backward's dh = d(norm) + dsum_out is
    the gradient of x and of residual_in, against torch autograd in float64."""
    shape, normalized = (2, 6, 5, 7), (6, 5, 7)
    x = in_format(rng.standard_normal(shape), fmt)
    r = laid_out_like(x, rng.standard_normal(shape))
    w = rng.standard_normal(normalized).astype(np.float32)
    y, rstd, h = normkit.rms_norm_forward(x, normalized, w, 1e-6, residual_in=r)
    assert np.array_equal(h, x + r) and h.strides == x.strides
    assert np.array_equal(y, normkit.rms_norm(h, normalized, w, 1e-6))

    dy = rng.standard_normal(shape).astype(np.float32)
    dsum = laid_out_like(x, rng.standard_normal(shape))
    dh, dw = normkit.rms_norm_backward(dy, h, normalized, rstd, w, dsum_out=dsum)
    x64, r64, w64 = (t64(a).requires_grad_() for a in (x, r, w))
    h64 = x64 + r64
    (rms_torch(h64, normalized, w64, 1e-6) * t64(dy)).sum().add((h64 * t64(dsum)).sum()).backward()
    assert_close(dh, n64(x64.grad), 1e-4, "dh vs dx")
    assert_close(dh, n64(r64.grad), 1e-4, "dh vs dresidual_in")
    assert_close(dw, n64(w64.grad), 1e-4, "dweight")


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_epilogues_match_torch(rng, activation, with_residual):
    shape, normalized = (3, 4, 9), (4, 9)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (1.0 + 0.5 * rng.standard_normal(normalized)).astype(np.float32)
    res = rng.standard_normal(shape).astype(np.float32) if with_residual else None
    y, rstd = normkit.rms_norm_forward(x, normalized, w, 1e-5, activation=activation,
                                       residual=res)
    x64, w64 = t64(x).requires_grad_(), t64(w).requires_grad_()
    pre = rms_torch(x64, normalized, w64, 1e-5) + (0 if res is None else t64(res))
    act = {None: lambda z: z, "relu": torch.relu, "silu": F.silu}[activation]
    y_ref = act(pre)
    assert_close(y, n64(y_ref), 1e-5, "y", 1.0)
    dy = rng.standard_normal(shape).astype(np.float32)
    kw = dict(residual=res) if activation == "silu" else {}
    grads = normkit.rms_norm_backward(dy, x, normalized, rstd, w, activation=activation,
                                      y=y if activation == "relu" else None,
                                      residual_grad=with_residual, **kw)
    assert len(grads) == (3 if with_residual else 2)
    if activation == "relu":  # the module's mask: a value within rounding of 0 may fall either way
        g = dy * (y > 0)
        pre.backward(t64(g))
    else:
        pre_leaf = pre.detach().requires_grad_()
        act(pre_leaf).backward(t64(dy))
        g = n64(pre_leaf.grad)
        pre.backward(pre_leaf.grad)
    assert_close(grads[0], n64(x64.grad), 1e-4, "dx", float(np.abs(g).max()))
    assert_close(grads[1], n64(w64.grad), 1e-4, "dweight")
    if with_residual:
        assert_close(grads[2], g, 1e-5, "dresidual", 1.0)


def test_empty_rows():
    x = np.zeros((0, 3, 5), np.float32)
    y, rstd = normkit.rms_norm_forward(x, (3, 5))
    assert y.shape == x.shape and rstd.shape == (0, 1, 1)
    dx, dw = normkit.rms_norm_backward(x, x, (3, 5), rstd, np.ones((3, 5), np.float32))
    assert dx.shape == x.shape and np.array_equal(dw, np.zeros((3, 5)))


def test_bad_arguments(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    y, rstd = normkit.rms_norm_forward(x, (3, 4))
    dy = np.ones_like(x)
    w = np.ones((3, 4), np.float32)
    cases = [
        (ValueError, ("rms_norm", "normalized_shape", "(3,)", "(2, 3, 4)"),
         lambda: normkit.rms_norm(x, 3)),
        (ValueError, ("rms_norm", "weight", "(4,)", "(3, 4)"),
         lambda: normkit.rms_norm(x, (3, 4), np.ones(4, np.float32))),
        (TypeError, ("rms_norm", "x", "float64"), lambda: normkit.rms_norm(x.astype(np.float64), 4)),
        (ValueError, ("rms_norm_forward", "eps"), lambda: normkit.rms_norm_forward(x, 4, eps=-1.0)),
        (ValueError, ("rms_norm_forward", "residual_in", "shape", "(2, 3, 5)"),
         lambda: normkit.rms_norm_forward(x, 4, residual_in=np.ones((2, 3, 5), np.float32))),
        (TypeError, ("rms_norm_forward", "residual_in", "float16"),
         lambda: normkit.rms_norm_forward(x, 4, residual_in=x.astype(np.float16))),
        (ValueError, ("rms_norm_backward", "dy", "(2, 3, 5)", "(2, 3, 4)"),
         lambda: normkit.rms_norm_backward(np.ones((2, 3, 5), np.float32), x, (3, 4), rstd)),
        (TypeError, ("rms_norm_backward", "dy", "float16", "float32"),
         lambda: normkit.rms_norm_backward(dy.astype(np.float16), x, (3, 4), rstd)),
        (ValueError, ("rms_norm_backward", "rstd", "(2,)", "(2, 1, 1)"),
         lambda: normkit.rms_norm_backward(dy, x, (3, 4), rstd.reshape(-1))),
        (ValueError, ("rms_norm_backward", "weight", "(4,)", "(3, 4)"),
         lambda: normkit.rms_norm_backward(dy, x, (3, 4), rstd, np.ones(4, np.float32))),
        (ValueError, ("rms_norm_backward", "dsum_out", "shape"),
         lambda: normkit.rms_norm_backward(dy, x, (3, 4), rstd, dsum_out=np.ones(3, np.float32))),
        (ValueError, ("rms_norm_backward", "y", "required", "relu"),
         lambda: normkit.rms_norm_backward(dy, x, (3, 4), rstd, activation="relu")),
        (ValueError, ("rms_norm_backward", "residual", "required", "silu"),
         lambda: normkit.rms_norm_backward(dy, x, (3, 4), rstd, activation="silu")),
        (ValueError, ("rms_norm", "activation", "'gelu'"),
         lambda: normkit.rms_norm(x, 4, activation="gelu")),
    ]
    for exception, fragments, call in cases:
        with raises(exception, *fragments):
            call()
    with pytest.raises(TypeError):
        normkit.rms_norm_backward(dy, x, (3, 4), rstd, bias=None)  # there is no bias
