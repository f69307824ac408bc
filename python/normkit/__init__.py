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
