"""instance_norm, instance_norm_forward and instance_norm_backward against
torch.nn.functional.instance_norm in float64 (running statistics over several steps included) and
finite differences."""

import numpy as np
import pytest
import torch.nn.functional as F

import normkit
from normkit_testing import (FORMATS, Config, assert_close, assert_normalized_close,
                             assert_same_layout, check_epilogue_errors, check_fused_epilogue,
                             finite_difference_check, in_format,
                             gradient_term_magnitude, moments, n64, per_channel,
                             per_sample_channel, raises, t64)


def random_config(rng, fmt, spatial_dims):
    channels = int(rng.choice([1, 2, 3, 5, 8]))
    cfg = Config(rng, channels, spatial_dims, fmt)
    if cfg.spatial_size == 1:  # instance statistics need two values
        cfg = Config(rng, channels, spatial_dims, fmt, spatial=[2] + [1] * (spatial_dims - 1))
    return cfg


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("with_running", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", (1, 2, 3))
@pytest.mark.parametrize("fmt", FORMATS)
def test_input_stats_match_torch(rng, fmt, spatial_dims, affine, with_running, seed):
    cfg = random_config(rng, fmt, spatial_dims)
    channels = cfg.shape[1]
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    w64 = t64(weight) if affine else None
    b64 = t64(bias) if affine else None
    momentum = float(rng.choice([0.1, 0.0, 1.0, 0.6]))
    running_mean = running_var = mean64 = var64 = None
    if with_running:
        running_mean = cfg.vector(channels, cfg.offset, cfg.scale)
        running_var = (cfg.scale ** 2 * rng.uniform(0.5, 2.0, channels)).astype(np.float32)
        mean64, var64 = t64(running_mean), t64(running_var)

    tol = cfg.tol()
    for step in range(3):
        x = cfg.activation()
        what = f"step {step} {cfg} momentum={momentum}"
        y = normkit.instance_norm(x, running_mean, running_var, weight, bias, True, momentum,
                                  cfg.eps)
        y_ref = F.instance_norm(t64(x), mean64, var64, w64, b64, True, momentum, cfg.eps)
        mean, rstd = moments(x, tuple(range(2, x.ndim)), cfg.eps)
        assert_normalized_close(y, n64(y_ref), x, mean, rstd,
                                per_channel(weight, x.ndim) if affine else None, "y " + what)
        assert_same_layout(y, fmt, x)
        if with_running:
            assert_close(running_mean, n64(mean64), tol, "running_mean " + what, cfg.value_size)
            assert_close(running_var, n64(var64), tol, "running_var " + what)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", (0, 1, 2, 3))
@pytest.mark.parametrize("fmt", FORMATS)
def test_running_stats_match_torch(rng, fmt, spatial_dims, affine, seed):
    """use_input_stats=False normalizes with the running statistics and leaves them alone."""
    if fmt == "channels_last" and spatial_dims == 0:
        pytest.skip("(N, C) has one memory format")
    channels = int(rng.choice([1, 2, 3, 5, 8]))
    cfg = Config(rng, channels, spatial_dims, fmt)
    x = cfg.activation()
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    running_mean = cfg.vector(channels, cfg.offset, 0.3 * cfg.scale)
    running_var = (cfg.scale ** 2 * rng.uniform(0.5, 2.0, channels)).astype(np.float32)
    before = running_mean.copy(), running_var.copy()
    y = normkit.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats=False,
                              eps=cfg.eps)
    y_ref = F.instance_norm(t64(x), t64(running_mean), t64(running_var),
                            t64(weight) if affine else None, t64(bias) if affine else None,
                            False, 0.1, cfg.eps)
    rstd = 1 / np.sqrt(running_var.astype(np.float64) + cfg.eps)
    assert_normalized_close(y, n64(y_ref), x, per_channel(running_mean, x.ndim),
                            per_channel(rstd, x.ndim),
                            per_channel(weight, x.ndim) if affine else None, f"y {cfg}")
    assert_same_layout(y, fmt, x)
    assert np.array_equal(running_mean, before[0]) and np.array_equal(running_var, before[1])


def test_empty_batch():
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    assert normkit.instance_norm(x).shape == x.shape
    assert normkit.instance_norm(x, rm, rv).shape == x.shape
    # Nothing to average: the running statistics are left as they were.
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


def test_bad_arguments_leave_running_statistics_alone(rng):
    x = Config(rng, 3, 2, "channels_last", batch=2, spatial=[3, 4]).activation()
    mean0, var0 = np.linspace(-1, 1, 3, dtype=np.float32), np.linspace(1, 2, 3, dtype=np.float32)
    rm, rv = mean0.copy(), var0.copy()

    def run(x=x, rm=rm, rv=rv, **kw):
        return normkit.instance_norm(x, rm, rv, **kw)

    cases = [
        (ValueError, ("more than 1 spatial element",), lambda: run(x=x[:, :, :1, :1])),
        (ValueError, ("more than 1 spatial element",), lambda: run(x=x[:, :, 0, 0])),
        (ValueError, ("weight", "4", "3"), lambda: run(weight=np.ones(4, np.float32))),
        (ValueError, ("bias", "1", "3"), lambda: run(bias=np.ones(1, np.float32))),
        (ValueError, ("running_mean", "2", "3"), lambda: run(rm=np.ones(2, np.float32))),
        (ValueError, ("eps", "-0.5"), lambda: run(eps=-0.5)),
        (ValueError, ("momentum", "2"), lambda: run(momentum=2.0)),
        (ValueError, ("momentum", "-1"), lambda: run(momentum=-1.0)),
        (ValueError, ("rank", "6"), lambda: run(x=x.reshape(1, *x.shape, 1))),
        (TypeError, ("x", "float64"), lambda: run(x=x.astype(np.float64))),
        (TypeError, ("running_mean", "float64"), lambda: run(rm=rm.astype(np.float64))),
        (ValueError, ("running_var", "contiguous"), lambda: run(rv=np.zeros(6, np.float32)[::2])),
    ]
    for exception, fragments, call in cases:
        with raises(exception, *fragments):
            call()
        assert np.array_equal(rm, mean0) and np.array_equal(rv, var0), fragments

    with raises(ValueError, "running_mean"):
        normkit.instance_norm(x, use_input_stats=False)
    frozen = mean0.copy()
    frozen.setflags(write=False)
    with raises(ValueError, "running_mean", "writable"):
        normkit.instance_norm(x, frozen, rv)
    assert np.array_equal(rv, var0)
    # Read-only statistics are fine where they are only read.
    normkit.instance_norm(x, frozen, rv, use_input_stats=False)


def reference_statistics(x, running_mean, running_var, use_input_stats, eps):
    """float64 (N, C) mean and rstd the forward normalizes with."""
    if use_input_stats:
        mean, rstd = moments(x, tuple(range(2, x.ndim)), eps)
        return mean.reshape(x.shape[:2]), rstd.reshape(x.shape[:2])
    mean = np.broadcast_to(running_mean.astype(np.float64), x.shape[:2])
    return mean, np.broadcast_to(1 / np.sqrt(running_var.astype(np.float64) + eps), x.shape[:2])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", (1, 2, 3))
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_statistics_and_backward_match_torch(rng, fmt, spatial_dims, affine,
                                                     use_input_stats, seed):
    cfg = random_config(rng, fmt, spatial_dims)
    channels = cfg.shape[1]
    x, dy = cfg.activation(), cfg.gradient()
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    running_mean = cfg.vector(channels, cfg.offset, 0.3 * cfg.scale)
    running_var = (cfg.scale ** 2 * rng.uniform(0.5, 2.0, channels)).astype(np.float32)
    rm, rv = running_mean.copy(), running_var.copy()
    momentum = 0.3

    y, save_mean, save_rstd = normkit.instance_norm_forward(
        x, rm, rv, weight, bias, use_input_stats, momentum, cfg.eps)
    what = f"{cfg} use_input_stats={use_input_stats}"
    x64 = t64(x).requires_grad_()
    w64 = t64(weight).requires_grad_() if affine else None
    b64 = t64(bias).requires_grad_() if affine else None
    rm64, rv64 = t64(running_mean), t64(running_var)
    y_ref = F.instance_norm(x64, rm64, rv64, w64, b64, use_input_stats, momentum, cfg.eps)
    mean_ref, rstd_ref = reference_statistics(x, running_mean, running_var, use_input_stats,
                                              cfg.eps)
    tol = cfg.tol()
    assert save_mean.shape == (cfg.batch, channels) and save_rstd.shape == save_mean.shape
    assert_close(save_mean, mean_ref, tol, "save_mean " + what, cfg.value_size)
    assert_close(save_rstd, rstd_ref, tol, "save_rstd " + what)
    assert_normalized_close(y, n64(y_ref), x, per_sample_channel(mean_ref, x.ndim),
                            per_sample_channel(rstd_ref, x.ndim),
                            per_channel(weight, x.ndim) if affine else None, "y " + what)
    assert_same_layout(y, fmt, x)
    assert_close(rm, n64(rm64), tol, "running_mean " + what, cfg.value_size)
    assert_close(rv, n64(rv64), tol, "running_var " + what)

    dx, dweight, dbias = normkit.instance_norm_backward(dy, x, save_mean, save_rstd, weight,
                                                        use_input_stats)
    y_ref.backward(t64(dy))
    terms = gradient_term_magnitude(dy, weight, per_sample_channel(rstd_ref, x.ndim))
    assert_close(dx, n64(x64.grad), 20 * tol, "dx " + what, terms)
    assert_same_layout(dx, fmt, x)
    if affine:
        assert_close(dweight, n64(w64.grad), 20 * tol, "dweight " + what)
        assert_close(dbias, n64(b64.grad), 20 * tol, "dbias " + what)
    else:
        assert dweight is None and dbias is None
    if not use_input_stats:
        # The same statistics formed from the running ones: the same bits.
        again = normkit.instance_norm_backward(dy, x, None, None, weight, False, running_mean,
                                               running_var, cfg.eps)
        for a, b in zip(again, (dx, dweight, dbias)):
            assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 2, 3, 3), (2, 1, 2, 3, 2)])
def test_backward_matches_finite_differences(rng, shape, use_input_stats):
    x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = (1.0 + 0.5 * rng.standard_normal(shape[1])).astype(np.float32)
    rm = rng.standard_normal(shape[1]).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    _, save_mean, save_rstd = normkit.instance_norm_forward(x, rm.copy(), rv.copy(), weight,
                                                            None, use_input_stats)
    dx, _, _ = normkit.instance_norm_backward(dy, x, save_mean, save_rstd, weight,
                                              use_input_stats)

    def forward64(x):
        mean, rstd = reference_statistics(x, rm, rv, use_input_stats, 1e-5)
        return ((x - per_sample_channel(mean, x.ndim)) * per_sample_channel(rstd, x.ndim)
                * per_channel(weight, x.ndim))

    finite_difference_check(forward64, x, dy, dx, 1e-4, f"shape={shape}", rng=rng)


def test_forward_backward_empty_batch():
    x = np.zeros((0, 3, 4), np.float32)
    y, mean, rstd = normkit.instance_norm_forward(x, weight=np.ones(3, np.float32))
    assert y.shape == x.shape and mean.shape == (0, 3) and rstd.shape == (0, 3)
    dx, dweight, dbias = normkit.instance_norm_backward(x, x, mean, rstd, np.ones(3, np.float32))
    assert dx.shape == x.shape
    assert np.array_equal(dweight, np.zeros(3)) and np.array_equal(dbias, np.zeros(3))


def test_backward_bad_arguments(rng):
    x = Config(rng, 3, 2, "channels_last", batch=2, spatial=[3, 4]).activation()
    _, mean, rstd = normkit.instance_norm_forward(x)
    dy = np.ones_like(x)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    run = normkit.instance_norm_backward
    cases = [
        (ValueError, ("dy", "(2, 3, 4, 3)"),
         lambda: run(np.ones((2, 3, 4, 3), np.float32), x, mean, rstd)),
        (TypeError, ("dy", "float64"), lambda: run(dy.astype(np.float64), x, mean, rstd)),
        (ValueError, ("save_mean", "(6,)", "(2, 3)"), lambda: run(dy, x, mean.reshape(-1), rstd)),
        (ValueError, ("save_rstd", "(3, 2)", "(2, 3)"),
         lambda: run(dy, x, mean, rstd.reshape(3, 2))),
        (TypeError, ("save_mean", "float64"), lambda: run(dy, x, mean.astype(np.float64), rstd)),
        (ValueError, ("save_mean", "save_rstd", "required"), lambda: run(dy, x, None, None)),
        (ValueError, ("more than 1 spatial element",),
         lambda: run(dy[:, :, :1, :1], x[:, :, :1, :1], mean, rstd)),
        (ValueError, ("weight", "4", "3"), lambda: run(dy, x, mean, rstd, np.ones(4, np.float32))),
        (ValueError, ("running_mean", "running_var"),
         lambda: run(dy, x, None, None, use_input_stats=False, running_mean=rm)),
        (ValueError, ("running_var", "2", "C = 3"),
         lambda: run(dy, x, None, None, None, False, rm, np.ones(2, np.float32))),
        (ValueError, ("eps", "-1"), lambda: run(dy, x, None, None, None, False, rm, rv, -1.0)),
        (TypeError, ("running_mean", "float64"),
         lambda: run(dy, x, None, None, None, False, rm.astype(np.float64), rv)),
    ]
    for exception, fragments, call in cases:
        with raises(exception, "instance_norm_backward", *fragments):
            call()


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial_dims", (1, 2, 3))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_epilogues_match_torch(rng, fmt, spatial_dims, affine, use_input_stats):
    channels = int(rng.choice([1, 3, 5]))
    cfg = Config(rng, channels, spatial_dims, fmt, batch=3, spatial=[3, 5, 2][:spatial_dims])
    x = in_format(1.0 + rng.standard_normal(cfg.shape), fmt)
    weight = cfg.vector(channels, 1.0, 0.5) if affine else None
    bias = cfg.vector(channels, 0.0, 2.0) if affine else None
    rm = cfg.vector(channels, 1.0, 0.3)
    rv = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    check_fused_epilogue(
        rng, x, weight, bias,
        lambda x, w, b, **kw: normkit.instance_norm_forward(x, rm, rv, w, b, use_input_stats,
                                                            0.0, 1e-5, **kw),
        lambda dy, x, saved, w, **kw: normkit.instance_norm_backward(dy, x, *saved, w,
                                                                     use_input_stats, **kw),
        lambda x64, w64, b64: F.instance_norm(x64, t64(rm), t64(rv), w64, b64, use_input_stats,
                                              0.0, 1e-5),
        1e-5, f"{cfg} use_input_stats={use_input_stats}")


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_epilogue_errors(rng, fmt):
    x = Config(rng, 3, 2, fmt, batch=2, spatial=[3, 4]).activation()
    check_epilogue_errors(
        x, lambda x, **kw: normkit.instance_norm_forward(x, **kw),
        lambda dy, x, saved, **kw: normkit.instance_norm_backward(dy, x, *saved, **kw))
