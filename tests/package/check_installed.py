"""The installed Python package: run from outside the repository, without PYTHONPATH, by
scripts/test-pip-package.sh after `pip install .`. Checks that `import normkit` finds the package
in site-packages, that it holds nothing but the package, and that group_norm and batch_norm agree
with a float64 NumPy reference. Prints a digest of its outputs, which the script compares with the
same calls through the CMake build tree's module (--digest-only): the same extension, the same
bits."""

import hashlib
import importlib.metadata
import os
import sys

import numpy as np

import normkit


def reference_group_norm(x, groups, weight, bias, eps):
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(axis=2, keepdims=True)
    var = grouped.var(axis=2, keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


def reference_batch_norm_training(x, running_mean, running_var, weight, bias, momentum, eps):
    x = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    count = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    return y * weight.reshape(shape) + bias.reshape(shape), new_mean, new_var


def outputs():
    """The calls whose results are checked and digested: odd sizes, both memory formats."""
    rng = np.random.default_rng(7)
    x = (3 + 2 * rng.standard_normal((3, 12, 7, 5))).astype(np.float32)
    x_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    weight = rng.standard_normal(12).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    out = {}
    for name, a in [("nchw", x), ("nhwc", x_last)]:
        out[f"group_norm/{name}"] = normkit.group_norm(a, 4, weight, bias, eps=1e-5)
        running_mean = np.zeros(12, np.float32)
        running_var = np.ones(12, np.float32)
        out[f"batch_norm/{name}"] = normkit.batch_norm(a, running_mean, running_var, weight, bias,
                                                        training=True, momentum=0.1, eps=1e-5)
        out[f"batch_norm/{name}/running_mean"] = running_mean
        out[f"batch_norm/{name}/running_var"] = running_var
    return x, weight, bias, out


def digest(out):
    h = hashlib.sha256()
    for name in sorted(out):
        h.update(name.encode())
        h.update(np.ascontiguousarray(out[name]).tobytes())
    return h.hexdigest()


def check(condition, message):
    if not condition:
        sys.exit(f"installed package: FAILED: {message}")


def main():
    x, weight, bias, out = outputs()
    if "--digest-only" in sys.argv:
        print(digest(out))
        return

    package_dir = os.path.dirname(os.path.abspath(normkit.__file__))
    check(os.path.basename(os.path.dirname(package_dir)) == "site-packages",
          f"normkit imported from {package_dir}, not from site-packages")
    check(normkit.__version__ == importlib.metadata.version("normkit"),
          f"__version__ {normkit.__version__} != the distribution's "
          f"{importlib.metadata.version('normkit')}")
    files = [str(f) for f in importlib.metadata.files("normkit")]
    stray = [f for f in files if not f.startswith(("normkit/", "normkit-"))]
    check(not stray, f"the wheel installs more than the package: {stray}")
    check(any(f.startswith("normkit/_normkit.") for f in files), f"no extension in {files}")

    y_ref = reference_group_norm(x, 4, weight, bias, 1e-5)
    y_bn, mean_ref, var_ref = reference_batch_norm_training(
        x, np.zeros(12), np.ones(12), weight, bias, 0.1, 1e-5)
    for name in ("nchw", "nhwc"):
        for what, got, want in [
                ("group_norm", out[f"group_norm/{name}"], y_ref),
                ("batch_norm", out[f"batch_norm/{name}"], y_bn),
                ("batch_norm running_mean", out[f"batch_norm/{name}/running_mean"], mean_ref),
                ("batch_norm running_var", out[f"batch_norm/{name}/running_var"], var_ref)]:
            error = np.max(np.abs(got.astype(np.float64) - want)) / max(1.0, np.max(np.abs(want)))
            check(error < 1e-5, f"{what} ({name}) differs from float64 NumPy by {error:.3g}")
    print(f"installed package: normkit {normkit.__version__} from {package_dir}: group_norm and "
          f"batch_norm match float64 NumPy")
    print(digest(out))


if __name__ == "__main__":
    main()
