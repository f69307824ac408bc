"""instance_norm against torch.nn.functional.instance_norm in float64, running statistics over
several steps included."""

import numpy as np
import pytest
import torch.nn.functional as F

import normkit
from normkit_testing import (FORMATS, Config, assert_close, assert_normalized_close,
                             assert_same_layout, moments, n64, per_channel, raises, t64)


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
