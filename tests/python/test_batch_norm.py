"""batch_norm, batch_norm_forward and batch_norm_backward against torch in float64, running
statistics over several training steps included."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit_testing import (FORMATS, Config, assert_close, assert_normalized_close,
                             assert_same_layout, check_epilogue_errors, check_fused_epilogue,
                             gradient_term_magnitude, in_format, n64, per_channel, raises, t64)

SPATIAL_DIMS = (0, 1, 2, 3)


def random_config(rng, fmt, spatial_dims):
    channels = int(rng.choice([1, 2, 3, 5, 8]))
    cfg = Config(rng, channels, spatial_dims, fmt)
    if cfg.batch * cfg.spatial_size == 1:  # training needs two values per channel
        cfg = Config(rng, channels, spatial_dims, fmt, batch=2)
    return cfg


def skip_same_as_channels_first(fmt, spatial_dims):
    if fmt == "channels_last" and spatial_dims == 0:
        pytest.skip("(N, C) has one memory format")


def running_stats(cfg, channels):
    """Running statistics near the data's, so inference outputs are of moderate size."""
    mean = cfg.vector(channels, cfg.offset, 0.3 * cfg.scale)
    var = (cfg.scale ** 2 * cfg.rng.uniform(0.5, 2.0, channels)).astype(np.float32)
    return mean, var


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("with_running", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_training_steps_match_torch(rng, fmt, spatial_dims, affine, with_running, seed):
    """Several training steps: y, the saved statistics and the running statistics."""
    skip_same_as_channels_first(fmt, spatial_dims)
    cfg = random_config(rng, fmt, spatial_dims)
    channels = cfg.shape[1]
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    w64 = t64(weight) if affine else None
    b64 = t64(bias) if affine else None
    momentum = float(rng.choice([0.1, 0.0, 1.0, 0.37]))
    if with_running:
        running_mean, running_var = running_stats(cfg, channels)
        mean64, var64 = t64(running_mean), t64(running_var)
    else:
        running_mean = running_var = mean64 = var64 = None

    tol = cfg.tol()
    for step in range(3):
        x = cfg.activation()
        what = f"step {step} {cfg} momentum={momentum}"
        # native_batch_norm in float64 gives the batch statistics (without touching running
        # ones: those are checked through F.batch_norm below).
        _, mean_ref, invstd_ref = torch.native_batch_norm(t64(x), w64, b64, None, None, True,
                                                          momentum, cfg.eps)
        if step == 1:
            y = normkit.batch_norm(x, running_mean, running_var, weight, bias, True, momentum,
                                   cfg.eps)
        else:
            y, save_mean, save_invstd = normkit.batch_norm_forward(
                x, running_mean, running_var, weight, bias, training=True, momentum=momentum,
                eps=cfg.eps)
            assert_close(save_mean, n64(mean_ref), tol, "save_mean " + what, cfg.value_size)
            assert_close(save_invstd, n64(invstd_ref), tol, "save_invstd " + what)
        y_ref = F.batch_norm(t64(x), mean64, var64, w64, b64, True, momentum, cfg.eps)
        assert_normalized_close(y, n64(y_ref), x, per_channel(n64(mean_ref), x.ndim),
                                per_channel(n64(invstd_ref), x.ndim),
                                per_channel(weight, x.ndim) if affine else None, "y " + what)
        assert_same_layout(y, fmt, x)
        if with_running:
            assert_close(running_mean, n64(mean64), tol, "running_mean " + what, cfg.value_size)
            assert_close(running_var, n64(var64), tol, "running_var " + what)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_inference_matches_torch(rng, fmt, spatial_dims, affine, seed):
    skip_same_as_channels_first(fmt, spatial_dims)
    cfg = random_config(rng, fmt, spatial_dims)
    channels = cfg.shape[1]
    x = cfg.activation()
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    running_mean, running_var = running_stats(cfg, channels)
    before = running_mean.copy(), running_var.copy()
    # Inference only reads the running statistics: read-only arrays are fine.
    running_mean.setflags(write=False)
    running_var.setflags(write=False)

    y, save_mean, save_invstd = normkit.batch_norm_forward(x, running_mean, running_var, weight,
                                                           bias, eps=cfg.eps)
    y_only = normkit.batch_norm(x, running_mean, running_var, weight, bias, eps=cfg.eps)
    y_ref = F.batch_norm(t64(x), t64(running_mean), t64(running_var),
                         t64(weight) if affine else None, t64(bias) if affine else None,
                         False, 0.1, cfg.eps)
    invstd = 1 / np.sqrt(running_var.astype(np.float64) + cfg.eps)
    assert_normalized_close(y, n64(y_ref), x, per_channel(running_mean, x.ndim),
                            per_channel(invstd, x.ndim),
                            per_channel(weight, x.ndim) if affine else None, f"y {cfg}")
    assert np.array_equal(y, y_only)
    assert_same_layout(y, fmt, x)
    assert save_mean.shape == (0,) and save_invstd.shape == (0,)
    assert np.array_equal(running_mean, before[0]) and np.array_equal(running_var, before[1])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_matches_autograd(rng, fmt, spatial_dims, affine, training, seed):
    skip_same_as_channels_first(fmt, spatial_dims)
    cfg = random_config(rng, fmt, spatial_dims)
    channels = cfg.shape[1]
    x, dy = cfg.activation(), cfg.gradient()
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    running_mean, running_var = running_stats(cfg, channels)

    _, save_mean, save_invstd = normkit.batch_norm_forward(
        x, running_mean.copy(), running_var.copy(), weight, bias, training, eps=cfg.eps)
    dx, dweight, dbias = normkit.batch_norm_backward(
        dy, x, weight, save_mean, save_invstd, training, running_mean, running_var, cfg.eps)

    x64 = t64(x).requires_grad_()
    w64 = t64(weight).requires_grad_() if affine else None
    b64 = t64(bias).requires_grad_() if affine else None
    F.batch_norm(x64, t64(running_mean), t64(running_var), w64, b64, training, 0.1,
                 cfg.eps).backward(t64(dy))
    if training:
        invstd = n64(torch.native_batch_norm(t64(x), None, None, None, None, True, 0.1,
                                             cfg.eps)[2])
    else:
        invstd = 1 / np.sqrt(running_var.astype(np.float64) + cfg.eps)
    terms = gradient_term_magnitude(dy, weight, per_channel(invstd, dy.ndim))
    tol = 20 * cfg.tol()
    what = f"{cfg} training={training}"
    assert_close(dx, n64(x64.grad), tol, "dx " + what, terms)
    assert_same_layout(dx, fmt, x)
    if affine:
        assert_close(dweight, n64(w64.grad), tol, "dweight " + what)
        assert_close(dbias, n64(b64.grad), tol, "dbias " + what)
    else:
        assert dweight is None and dbias is None


def test_running_statistics_as_torch_module(rng):
    """Against torch.nn.BatchNorm2d over several steps, then inference with what it learned."""
    cfg = Config(rng, 5, 2, "channels_last", batch=3)
    module = torch.nn.BatchNorm2d(5, eps=cfg.eps, momentum=0.3)
    running_mean, running_var = np.zeros(5, np.float32), np.ones(5, np.float32)
    with torch.no_grad():
        for _ in range(4):
            x = cfg.activation()
            module.train()(t64(x))
            normkit.batch_norm(x, running_mean, running_var, training=True, momentum=0.3,
                               eps=cfg.eps)
        assert_close(running_mean, n64(module.running_mean), cfg.tol(), "running_mean",
                     cfg.value_size)
        assert_close(running_var, n64(module.running_var), cfg.tol(), "running_var")
        x = cfg.activation()
        y = normkit.batch_norm(x, running_mean, running_var, eps=cfg.eps)
        invstd = 1 / np.sqrt(running_var.astype(np.float64) + cfg.eps)
        assert_normalized_close(y, n64(module.eval()(t64(x))), x, per_channel(running_mean, 4),
                                per_channel(invstd, 4), None, "y (inference)")


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_empty_batch(fmt):
    x = np.zeros((0, 4, 3, 5), np.float32)
    if fmt == "channels_last":
        x = np.moveaxis(np.zeros((0, 3, 5, 4), np.float32), -1, 1)
    running_mean, running_var = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    y, save_mean, save_invstd = normkit.batch_norm_forward(x, running_mean, running_var,
                                                           training=True)
    assert y.shape == x.shape and y.dtype == np.float32
    assert save_mean.shape == (4,) and save_invstd.shape == (4,)
    assert np.all(np.isfinite(save_mean)) and np.all(np.isfinite(save_invstd))
    # As torch: nothing to average, the running statistics stay as they were.
    assert np.all(running_mean == 0.5) and np.all(running_var == 2.0)
    assert normkit.batch_norm(x, running_mean, running_var).shape == x.shape
    w = np.ones(4, np.float32)
    for training in (True, False):
        dx, dweight, dbias = normkit.batch_norm_backward(x, x, w, save_mean, save_invstd,
                                                         training, running_mean, running_var)
        assert dx.shape == x.shape
        assert np.array_equal(dweight, np.zeros(4)) and np.array_equal(dbias, np.zeros(4))


def test_bad_arguments_leave_running_statistics_alone(rng):
    x = Config(rng, 3, 1, "channels_first", batch=2, spatial=[5]).activation()
    mean0, var0 = np.linspace(-1, 1, 3, dtype=np.float32), np.linspace(1, 2, 3, dtype=np.float32)
    rm, rv = mean0.copy(), var0.copy()
    w = np.ones(3, np.float32)

    def train(x=x, rm=rm, rv=rv, **kw):
        return normkit.batch_norm(x, rm, rv, training=True, **kw)

    cases = [
        (ValueError, ("more than 1 value per channel",), lambda: train(x=x[:1, :, :1])),
        (ValueError, ("more than 1 value per channel",), lambda: train(x=x[:1, :, 0])),
        (ValueError, ("weight", "4", "3"), lambda: train(weight=np.ones(4, np.float32))),
        (ValueError, ("bias", "2", "3"), lambda: train(weight=w, bias=np.ones(2, np.float32))),
        (ValueError, ("running_var", "5", "3"), lambda: train(rv=np.ones(5, np.float32))),
        (ValueError, ("running_mean", "2", "3"), lambda: train(rm=np.ones(2, np.float32))),
        (ValueError, ("eps", "-0.5"), lambda: train(eps=-0.5)),
        (ValueError, ("eps",), lambda: train(eps=float("inf"))),
        (ValueError, ("momentum", "1.5"), lambda: train(momentum=1.5)),
        (ValueError, ("momentum", "-0.1"), lambda: train(momentum=-0.1)),
        (ValueError, ("momentum",), lambda: train(momentum=float("nan"))),
        (ValueError, ("rank", "1"), lambda: train(x=x[0, 0])),
        (ValueError, ("rank", "6"), lambda: train(x=x.reshape(1, *x.shape, 1, 1))),
        (ValueError, ("running_mean", "given together"),
         lambda: normkit.batch_norm(x, rm, None, training=True)),
        (TypeError, ("x", "float64"), lambda: train(x=x.astype(np.float64))),
        (TypeError, ("x", "int64"), lambda: train(x=x.astype(np.int64))),
        (TypeError, ("weight", "float64"), lambda: train(weight=w.astype(np.float64))),
        # Running statistics are written in place, so they must be the caller's float32 memory.
        (TypeError, ("running_var", "float64"), lambda: train(rv=rv.astype(np.float64))),
        (ValueError, ("running_mean", "1-D"), lambda: train(rm=rm.reshape(1, 3))),
    ]
    for exception, fragments, call in cases:
        with raises(exception, *fragments):
            call()
        assert np.array_equal(rm, mean0) and np.array_equal(rv, var0), fragments

    strided = np.zeros(6, np.float32)[::2]
    with raises(ValueError, "running_mean", "contiguous"):
        normkit.batch_norm(x, strided, rv, training=True)
    frozen = mean0.copy()
    frozen.setflags(write=False)
    with raises(ValueError, "running_mean", "writable"):
        normkit.batch_norm(x, frozen, rv, training=True)
    assert np.array_equal(rv, var0) and np.array_equal(frozen, mean0)

    # Inference needs running statistics, as torch ("must be defined in evaluation mode").
    with raises(ValueError, "running_mean"):
        normkit.batch_norm(x, None, None)
    with raises(ValueError, "running_var"):
        normkit.batch_norm(x, rm, None)
    # Training without them uses the batch statistics only.
    assert normkit.batch_norm(x, None, None, training=True).shape == x.shape


def test_backward_bad_arguments(rng):
    x = Config(rng, 3, 2, "channels_first", batch=2, spatial=[3, 4]).activation()
    w = np.ones(3, np.float32)
    _, save_mean, save_invstd = normkit.batch_norm_forward(x, None, None, w, training=True)
    dy = np.ones_like(x)
    with raises(ValueError, "dy", "(2, 3, 4)"):
        normkit.batch_norm_backward(np.ones((2, 3, 4), np.float32), x, w, save_mean, save_invstd)
    with raises(ValueError, "dy", "(2, 4"):
        normkit.batch_norm_backward(np.ones((2, 4) + x.shape[2:], np.float32), x, w, save_mean,
                                    save_invstd)
    with raises(ValueError, "save_mean", "2", "3"):
        normkit.batch_norm_backward(dy, x, w, save_mean[:2], save_invstd)
    with raises(ValueError, "save_invstd", "4", "3"):
        normkit.batch_norm_backward(dy, x, w, save_mean, np.ones(4, np.float32))
    with raises(ValueError, "save_mean", "required"):
        normkit.batch_norm_backward(dy, x, w, None, None)
    with raises(ValueError, "weight", "2", "3"):
        normkit.batch_norm_backward(dy, x, w[:2], save_mean, save_invstd)
    with raises(ValueError, "running_mean", "required"):
        normkit.batch_norm_backward(dy, x, w, None, None, training=False)
    with raises(ValueError, "running_var", "5", "3"):
        normkit.batch_norm_backward(dy, x, w, None, None, False, w, np.ones(5, np.float32))
    with raises(ValueError, "eps"):
        normkit.batch_norm_backward(dy, x, w, None, None, False, w, w, eps=-1.0)
    with raises(TypeError, "dy", "float64"):
        normkit.batch_norm_backward(dy.astype(np.float64), x, w, save_mean, save_invstd)
    with raises(TypeError, "save_invstd", "float64"):
        normkit.batch_norm_backward(dy, x, w, save_mean, save_invstd.astype(np.float64))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_epilogues_match_torch(rng, fmt, spatial_dims, affine, training):
    if fmt == "channels_last" and spatial_dims == 0:
        pytest.skip("(N, C) has one memory format")
    channels = int(rng.choice([1, 3, 5]))
    cfg = Config(rng, channels, spatial_dims, fmt, batch=3, spatial=[3, 5, 2][:spatial_dims])
    x = in_format(1.0 + rng.standard_normal(cfg.shape), fmt)
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    rm = cfg.vector(channels, 1.0, 0.3)
    rv = rng.uniform(0.5, 2.0, channels).astype(np.float32)

    def forward(x, w, b, **kw):
        # Training on copies: the running statistics are the caller's to keep as they were.
        return normkit.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, 0.1, 1e-5,
                                          **kw)

    def backward(dy, x, saved, w, **kw):
        return normkit.batch_norm_backward(dy, x, w, *saved, training, rm, rv, 1e-5, **kw)

    check_fused_epilogue(
        rng, x, weight, bias, forward, backward,
        lambda x64, w64, b64: F.batch_norm(x64, t64(rm), t64(rv), w64, b64, training, 0.1,
                                           1e-5),
        1e-5, f"{cfg} training={training}")


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_epilogue_errors(rng, fmt):
    x = Config(rng, 6, 2, fmt, batch=2, spatial=[3, 4]).activation()
    check_epilogue_errors(
        x, lambda x, **kw: normkit.batch_norm_forward(x, None, None, training=True, **kw),
        lambda dy, x, saved, **kw: normkit.batch_norm_backward(dy, x, None, *saved, **kw))
