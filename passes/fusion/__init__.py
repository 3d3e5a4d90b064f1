"""Fusion passes: graph rewrites that merge or remove operators.

Importing this package registers every pass in it: each public module of the
package (a name not starting with ``_``) is imported, so a new module joins
by being added to the folder; nothing here needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
