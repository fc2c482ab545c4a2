"""swarmfly.plugins: the plugin API (``hookspecs``) and the built-in plugins.

Plugin authors need only ``hookimpl`` and the types in ``swarmfly.plugins.hookspecs``.
"""

from swarmfly.plugins.hookspecs import hookimpl

__all__ = ["hookimpl"]
