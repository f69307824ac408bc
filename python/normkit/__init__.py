# The package `normkit`: the compiled extension normkit._normkit (normkit_module.cpp), re-exported,
# so that Python-only submodules can live beside it. Built by CMake into <build>/python/normkit/
# and installed from there by `pip install .`; this file is copied, not edited in the build tree.

from . import _normkit

# Every name the extension defines, its test hooks (one leading underscore) included.
globals().update({name: getattr(_normkit, name) for name in dir(_normkit)
                  if not name.startswith("__")})
__doc__ = _normkit.__doc__
__version__ = _normkit.__version__
__all__ = [name for name in dir(_normkit) if not name.startswith("_")]


def _check_numpy_support(pybind11_version, numpy_version):
    """Raises ImportError when the extension's pybind11 (major, minor) predates NumPy 2 support
    (2.12) and the NumPy in use (a version string) is 2 or later: such a build reads NumPy 2's
    arrays with NumPy 1's struct layout and would reject or misread them."""
    numpy_major = int(numpy_version.split(".")[0])
    if numpy_major >= 2 and tuple(pybind11_version) < (2, 12):
        raise ImportError(
            "normkit: this build of the extension uses pybind11 %d.%d, which does not support "
            "NumPy %s (NumPy 2 needs pybind11 2.12 or later). Rebuild normkit against a newer "
            "pybind11 (`python3 -m pip install .` does), or use NumPy 1.x."
            % (pybind11_version[0], pybind11_version[1], numpy_version))


try:
    import numpy as _numpy
except ImportError:  # arrays can then only come through DLPack
    pass
else:
    _check_numpy_support(_normkit._pybind11_version, _numpy.__version__)
