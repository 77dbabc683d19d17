"""The transformers versions this toolkit is tested with, and the one seam that moved between them.

* `TESTED_TRANSFORMERS`: the range the test suite has passed on (the floor and the ceiling were
  both run; `constraints.txt` pins the version CI and the demo use). Importing `msrnn_train` with
  a version outside it warns once, naming the installed version, the range and the command that
  installs the tested set (`check_transformers`).
* `CACHE_KWARG`: the name under which a model's forward takes its cache. transformers 5.24
  renamed `past_key_values` to `cache` (the old name still works there, with a deprecation
  warning); the decoder hook and every call of the toolkit use the installed version's name.
"""

from __future__ import annotations

import warnings

import transformers
from packaging.version import Version

# [floor, ceiling] both tested: `bash scripts/test.sh` on the pinned version (constraints.txt) and
# the cache/fidelity/inference tests on the floor (see README, "Tested versions")
TESTED_TRANSFORMERS = ("5.20.2", "5.25.0")
UPGRADE_HINT = "pip install -c constraints.txt -e . (or: bash scripts/setup.sh)"

CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
_OTHER_CACHE_KWARG = "past_key_values" if CACHE_KWARG == "cache" else "cache"

_warned: list[str] = []


def check_transformers(version: str | None = None) -> bool:
    """Warn once (a `UserWarning`) when `version` (default: the installed transformers) lies
    outside the tested range. Returns True when it lies inside."""
    version = transformers.__version__ if version is None else version
    lo, hi = TESTED_TRANSFORMERS
    v = Version(version).release
    inside = Version(lo).release <= v[:3] and v[:2] <= Version(hi).release[:2]
    if not inside and version not in _warned:
        _warned.append(version)
        warnings.warn(
            f"msrnn_train: transformers {version} is installed, but msrnn-train is tested with transformers "
            f">={lo},<={hi} (its bounded cache plugs into transformers' Cache and attention seams, which change "
            f"between releases). Install the tested set: {UPGRADE_HINT}",
            UserWarning, stacklevel=2)
    return inside


def take_cache(kwargs: dict):
    """The cache passed to a model forward under either name (moved to the installed version's
    name, in place), or None."""
    if kwargs.get(_OTHER_CACHE_KWARG) is not None and kwargs.get(CACHE_KWARG) is None:
        kwargs[CACHE_KWARG] = kwargs.pop(_OTHER_CACHE_KWARG)
    else:
        kwargs.pop(_OTHER_CACHE_KWARG, None)
    return kwargs.get(CACHE_KWARG)


def cache_kwargs(cache) -> dict:
    """`model(**inputs, **cache_kwargs(cache))`: the cache under the installed version's name."""
    return {CACHE_KWARG: cache}
