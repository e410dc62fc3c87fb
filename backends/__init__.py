"""hal.backends: the built-in backends, each registered through the `hal.plugins` entry point.

This package is also what `hal.backends()` calls: the package name and the listing function share
the name `hal.backends`, so the module itself is made callable and returns `hal.list_backends()`.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self):
        from hal import list_backends

        return list_backends()


sys.modules[__name__].__class__ = _CallablePackage
