"""group_norm, group_norm_forward and group_norm_backward against torch in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit_testing import (FORMATS, Config, assert_close, assert_normalized_close,
                             assert_same_layout, check_epilogue_errors, check_fused_epilogue,
                             gradient_term_magnitude, in_format, laid_out_like, n64,
                             per_channel, per_sample_channel, raises, t64)

SPATIAL_DIMS = (0, 1, 2, 3)


def random_groups(rng):
    """(C, G) with G = 1, G = C, odd C/G and odd C all drawn."""
    groups = int(rng.choice([1, 1, 2, 3, 4, 7]))
    per_group = int(rng.choice([1, 1, 2, 3, 5]))
    return groups * per_group, groups


def skip_same_as_channels_first(fmt, spatial_dims):
    if fmt == "channels_last" and spatial_dims == 0:
        pytest.skip("(N, C) has one memory format")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_matches_torch(rng, fmt, spatial_dims, affine, seed):
    skip_same_as_channels_first(fmt, spatial_dims)
    channels, groups = random_groups(rng)
    cfg = Config(rng, channels, spatial_dims, fmt)
    x = cfg.activation()
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None

    y, mean, rstd = normkit.group_norm_forward(x, groups, weight, bias, eps=cfg.eps)
    y_only = normkit.group_norm(x, groups, weight, bias, cfg.eps)

    w64 = t64(weight) if affine else None
    b64 = t64(bias) if affine else None
    y_ref, mean_ref, rstd_ref = torch.native_group_norm(
        t64(x), w64, b64, cfg.batch, channels, cfg.spatial_size, groups, cfg.eps)
    tol = cfg.tol()
    ndim = x.ndim
    mean_c = per_sample_channel(np.repeat(n64(mean_ref), channels // groups, axis=1), ndim)
    rstd_c = per_sample_channel(np.repeat(n64(rstd_ref), channels // groups, axis=1), ndim)
    w_c = per_channel(weight, ndim) if affine else None
    assert_normalized_close(y, n64(y_ref), x, mean_c, rstd_c, w_c, f"y {cfg} G={groups}")
    assert_close(mean, n64(mean_ref), tol, f"mean {cfg}", cfg.value_size)
    assert_close(rstd, n64(rstd_ref), tol, f"rstd {cfg}")
    assert np.array_equal(y_only, y), "group_norm and group_norm_forward differ"
    assert_same_layout(y, fmt, x)
    assert_same_layout(y_only, fmt, x)
    # torch's functional form agrees, where it runs: it refuses one value per "channel" when
    # N * C / G * spatial == 1, a check normkit does not copy (each group is still well defined).
    if cfg.batch * (channels // groups) * cfg.spatial_size > 1:
        y_functional = F.group_norm(t64(x), groups, w64, b64, cfg.eps)
        assert_normalized_close(y_only, n64(y_functional), x, mean_c, rstd_c, w_c,
                                "F.group_norm")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_matches_autograd(rng, fmt, spatial_dims, affine, seed):
    skip_same_as_channels_first(fmt, spatial_dims)
    channels, groups = random_groups(rng)
    if spatial_dims == 0 and channels == groups:
        channels *= 2  # one value per group has dx = 0 exactly; forward tests cover it
    cfg = Config(rng, channels, spatial_dims, fmt)
    if channels == groups and cfg.spatial_size == 1:
        cfg = Config(rng, channels, spatial_dims, fmt, spatial=[3] * spatial_dims)
    x = cfg.activation()
    dy = cfg.gradient()
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None

    _, mean, rstd = normkit.group_norm_forward(x, groups, weight, bias, eps=cfg.eps)
    dx, dweight, dbias = normkit.group_norm_backward(dy, x, mean, rstd, groups, weight)

    x64 = t64(x).requires_grad_()
    w64 = t64(weight).requires_grad_() if affine else None
    b64 = t64(bias).requires_grad_() if affine else None
    F.group_norm(x64, groups, w64, b64, cfg.eps).backward(t64(dy))
    tol = 20 * cfg.tol()
    rstd_per_channel = np.repeat(rstd, channels // groups, axis=1)
    terms = gradient_term_magnitude(dy, weight, rstd_per_channel.reshape(
        cfg.batch, channels, *([1] * spatial_dims)))
    assert_close(dx, n64(x64.grad), tol, f"dx {cfg} G={groups}", terms)
    assert_same_layout(dx, fmt, x)
    if affine:
        assert_close(dweight, n64(w64.grad), tol, f"dweight {cfg}")
        assert_close(dbias, n64(b64.grad), tol, f"dbias {cfg}")
    else:
        assert dweight is None and dbias is None


def test_backward_with_torch_statistics(rng):
    """The backward takes any (N, G) statistics, e.g. torch's own, not only normkit's."""
    cfg = Config(rng, 6, 2, "channels_last")
    x, dy, weight = cfg.activation(), cfg.gradient(), cfg.vector(6)
    _, mean, rstd = torch.native_group_norm(t64(x), None, None, cfg.batch, 6, cfg.spatial_size,
                                            3, cfg.eps)
    dx, dweight, dbias = normkit.group_norm_backward(
        dy, x, n64(mean).astype(np.float32), n64(rstd).astype(np.float32), 3, weight)
    x64, w64 = t64(x).requires_grad_(), t64(weight).requires_grad_()
    F.group_norm(x64, 3, w64, None, cfg.eps).backward(t64(dy))
    assert_close(dx, n64(x64.grad), 20 * cfg.tol(), "dx")
    assert_close(dweight, n64(w64.grad), 20 * cfg.tol(), "dweight")
    assert_close(dbias, t64(dy).sum(dim=[0, 2, 3]).numpy(), 20 * cfg.tol(), "dbias")


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_empty_batch(fmt):
    x = np.zeros((0, 6, 3, 5), np.float32)
    if fmt == "channels_last":
        x = torch.zeros(0, 6, 3, 5).float().contiguous(memory_format=torch.channels_last).numpy()
    y, mean, rstd = normkit.group_norm_forward(x, 3, np.ones(6, np.float32))
    assert y.shape == (0, 6, 3, 5) and y.dtype == np.float32
    assert mean.shape == (0, 3) and rstd.shape == (0, 3)
    dx, dweight, dbias = normkit.group_norm_backward(x, x, mean, rstd, 3, np.ones(6, np.float32))
    assert dx.shape == x.shape
    # torch's gradients of an empty batch are zero
    assert np.array_equal(dweight, np.zeros(6)) and np.array_equal(dbias, np.zeros(6))


def test_bad_arguments(rng):
    x = Config(rng, 6, 2, "channels_first", batch=2, spatial=[3, 4]).activation()
    w = np.ones(6, np.float32)
    with raises(ValueError, "num_groups", "6", "4"):
        normkit.group_norm(x, 4)
    with raises(ValueError, "num_groups", "0"):
        normkit.group_norm(x, 0)
    with raises(ValueError, "num_groups", "-2"):
        normkit.group_norm(x, -2)
    with raises(ValueError, "weight", "5", "6"):
        normkit.group_norm(x, 3, np.ones(5, np.float32))
    with raises(ValueError, "bias", "7", "6"):
        normkit.group_norm(x, 3, w, np.ones(7, np.float32))
    with raises(ValueError, "weight", "1-D"):
        normkit.group_norm(x, 3, np.ones((2, 3), np.float32))
    with raises(ValueError, "rank", "1"):
        normkit.group_norm(np.ones(6, np.float32), 3)
    with raises(ValueError, "rank", "6"):
        normkit.group_norm(np.ones((1, 6, 1, 1, 1, 1), np.float32), 3)
    with raises(ValueError, "eps", "-0.5"):
        normkit.group_norm(x, 3, eps=-0.5)
    with raises(ValueError, "eps"):
        normkit.group_norm(x, 3, eps=float("nan"))
    with raises(ValueError, "eps"):
        normkit.group_norm(x, 3, eps=float("inf"))
    with raises(TypeError, "x", "float64"):
        normkit.group_norm(x.astype(np.float64), 3)
    with raises(TypeError, "x", "int32"):
        normkit.group_norm(x.astype(np.int32), 3)
    with raises(TypeError, "x", ">f4"):
        normkit.group_norm(x.astype(">f4"), 3)
    with raises(TypeError, "weight", "float64"):
        normkit.group_norm(x, 3, w.astype(np.float64))

    _, mean, rstd = normkit.group_norm_forward(x, 3)
    dy = np.ones_like(x)
    with raises(ValueError, "dy", "(2, 6, 5, 5)"):
        normkit.group_norm_backward(np.ones((2, 6, 5, 5), np.float32), x, mean, rstd, 3)
    with raises(ValueError, "mean", "(2, 3)", "(6,)"):
        normkit.group_norm_backward(dy, x, mean.reshape(-1), rstd, 3)
    with raises(ValueError, "rstd", "(2, 3)", "(3, 2)"):
        normkit.group_norm_backward(dy, x, mean, rstd.reshape(3, 2), 3)
    with raises(ValueError, "mean", "(2, 2)"):
        normkit.group_norm_backward(dy, x, mean, rstd, 2)
    with raises(ValueError, "num_groups", "4"):
        normkit.group_norm_backward(dy, x, mean, rstd, 4)
    with raises(ValueError, "weight", "3", "6"):
        normkit.group_norm_backward(dy, x, mean, rstd, 3, np.ones(3, np.float32))
    with raises(TypeError, "dy", "float64"):
        normkit.group_norm_backward(dy.astype(np.float64), x, mean, rstd, 3)
    with raises(TypeError, "mean", "float64"):
        normkit.group_norm_backward(dy, x, mean.astype(np.float64), rstd, 3)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_epilogues_match_torch(rng, fmt, spatial_dims, affine):
    skip_same_as_channels_first(fmt, spatial_dims)
    channels, groups = random_groups(rng)
    cfg = Config(rng, channels, spatial_dims, fmt, batch=3, spatial=[3, 5, 2][:spatial_dims])
    x = in_format(1.0 + rng.standard_normal(cfg.shape), fmt)
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    check_fused_epilogue(
        rng, x, weight, bias,
        lambda x, w, b, **kw: normkit.group_norm_forward(x, groups, w, b, 1e-5, **kw),
        lambda dy, x, saved, w, **kw: normkit.group_norm_backward(dy, x, *saved, groups, w,
                                                                  **kw),
        lambda x64, w64, b64: F.group_norm(x64, groups, w64, b64, 1e-5),
        1e-5, f"{cfg} G={groups}")
    # The functional form fuses the same epilogue: the same bits.
    residual = laid_out_like(normkit.group_norm(x, groups), rng.standard_normal(x.shape))
    assert np.array_equal(
        normkit.group_norm(x, groups, weight, bias, activation="relu", residual=residual),
        normkit.group_norm_forward(x, groups, weight, bias, activation="relu",
                                   residual=residual)[0])


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_epilogue_errors(rng, fmt):
    x = Config(rng, 6, 2, fmt, batch=2, spatial=[3, 4]).activation()
    check_epilogue_errors(
        x, lambda x, **kw: normkit.group_norm_forward(x, 3, **kw),
        lambda dy, x, saved, **kw: normkit.group_norm_backward(dy, x, *saved, 3, **kw))
