"""Run code just after a module is imported, without importing it: how permllm registers with transformers.

`optimum_permllm-autoload.pth` (put in site-packages by an install) makes Python, at every start, put a small
finder first on `sys.meta_path` that imports nothing; when transformers imports its quantizer registry
(`transformers.quantizers`) it calls `registering_spec` here, which imports optimum_permllm just after the
registry is loaded (optimum_permllm registers itself). So a permllm checkpoint loads with transformers alone,
and a process that never imports transformers pays one string comparison per import.
`import optimum_permllm` registers through `when_imported` too, so a clone without the .pth registers once the package
is imported.
Standard library only, and nothing here may break an import of transformers: a broken optimum_permllm gives a
warning, a missing one is ignored.
"""

import sys

_watched: dict[str, list] = {}  # module name -> callbacks to run once that module has been imported


def when_imported(name: str, callback) -> None:
    """Call `callback(module)` now if module `name` is imported (or under way: called from its import, after its
    code ran), otherwise just after its import finishes."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    callbacks = _watched.setdefault(name, [])
    if callback not in callbacks:
        callbacks.append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def registering_spec(name: str, path=None, target=None):
    """The spec of `name` (transformers.quantizers) from the other finders, set to import optimum_permllm once
    the module has run; None when no finder has it."""
    return _spec_with_callbacks(name, path, target, [_register_permllm])


def install() -> None:
    """What the .pth of an earlier install calls at Python's start (an editable install keeps the .pth it copied
    until `pip install -e .` runs again, while this module comes from the source tree): the same registration."""
    when_imported("transformers.quantizers", _register_permllm)


def _register_permllm(_registry) -> None:
    try:
        import optimum_permllm  # noqa: F401  (registers itself with the registry that has just been imported)
    except ModuleNotFoundError as error:
        if error.name != "optimum_permllm":  # optimum_permllm is there but one of its dependencies is not
            _warn(error)
    except Exception as error:  # noqa: BLE001  (a broken install must not stop transformers)
        _warn(error)


def _warn(error: Exception) -> None:
    import warnings

    warnings.warn(f"optimum_permllm could not register quant_method='permllm' with transformers ({error!r}); "
                  "permllm checkpoints will not load. `import optimum_permllm` shows the full error.", RuntimeWarning,
                  stacklevel=2)


class _Finder:
    """A sys.meta_path entry that finds nothing itself: it wraps the loader of a watched module."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        callbacks = _watched.pop(name, None)  # popped first: a finder asked below may import `name` itself
        if callbacks is None:
            return None
        spec = _spec_with_callbacks(name, path, target, callbacks)
        if spec is None:  # not importable (yet): keep watching
            _watched[name] = callbacks
            return None
        if not _watched:
            sys.meta_path.remove(_finder)
        return spec


def _spec_with_callbacks(name, path, target, callbacks):
    """The spec the import system would use without this module's finder, its loader set to run `callbacks`."""
    for finder in list(sys.meta_path):  # a copy: a finder asked may remove itself
        if finder is not _finder and hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, callbacks)
                return spec
    return None


class _Loader:
    """Runs the real loader, then the callbacks waiting for the module."""

    def __init__(self, loader, callbacks):
        self._loader, self._callbacks = loader, callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


_finder = _Finder()
