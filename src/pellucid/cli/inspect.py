"""pellucid inspect / params / attention / lens / ablate: the model's internals, formatted.

The work is done by pellucid.inspect (functions returning dataclasses); this module only
parses options, calls them, and prints tables or writes pictures.
"""

from __future__ import annotations

from pellucid.cli import app  # noqa: F401  (commands register on `app`)
