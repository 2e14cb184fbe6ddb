"""Sorts the release names of an old build system, some of which are not PEP 440
versions: it needs packaging's LegacyVersion, which packaging 22 removed."""

import warnings

import packaging
from packaging.version import LegacyVersion, parse

warnings.simplefilter("ignore", DeprecationWarning)  # LegacyVersion is deprecated in 21.x
releases = ["1.5", "2.0-final-legacy", "1.0", "nightly-2019"]
ordered = sorted(releases, key=parse)
legacy = [r for r in releases if isinstance(parse(r), LegacyVersion)]
print(f"legacy-app: packaging {packaging.__version__}: {ordered} (legacy names: {legacy})")
