"""Normalises the licence expressions of dependencies: it needs packaging.licenses,
new in packaging 24.2."""

import packaging
from packaging.licenses import canonicalize_license_expression

found = ["mit", "apache-2.0 OR bsd-3-clause", "GPL-2.0-only with classpath-exception-2.0"]
print(
    f"modern-app: packaging {packaging.__version__}: "
    f"{[canonicalize_license_expression(e) for e in found]}"
)
