"""Test configuration: every public annotation of attnres_lens is checked at runtime.

The jaxtyping import hook must be installed before anything imports ``attnres_lens``: it
decorates every function and class in the package with ``jaxtyping.jaxtyped(typechecker=
beartype)``, so shape names (``batch pos source``) are checked for consistency within a call.
"""

from jaxtyping import install_import_hook

with install_import_hook("attnres_lens", "beartype.beartype"):
    import attnres_lens  # noqa: F401
