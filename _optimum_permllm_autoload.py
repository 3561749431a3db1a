"""Registers quant_method="permllm" with transformers when transformers needs it, without `import optimum_permllm`.

`optimum_permllm-autoload.pth`, installed next to this module in site-packages, imports it when Python
starts. Until transformers imports its quantizer registry (`transformers.quantizers`) it only watches
imports; then it imports optimum_permllm, which registers itself. Standard library only, and nothing here
may break Python's start: a broken optimum_permllm gives a warning, a missing one is ignored.
"""

import sys

_REGISTRY = "transformers.quantizers"
_watched: dict[str, list] = {}  # module name -> callbacks to run once that module has been imported


def when_imported(name: str, callback) -> None:
    """Call `callback(module)` now if module `name` is imported, otherwise just after its import finishes."""
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        callback(module)
        return
    if module is not None:  # being imported higher up the stack: too late to watch, and not yet usable
        raise ImportError(f"{name} is still being imported; cannot run {callback!r} after it")
    callbacks = _watched.setdefault(name, [])
    if callback not in callbacks:
        callbacks.append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def install() -> None:
    """Register permllm with transformers as soon as transformers imports its quantizer registry (idempotent)."""
    when_imported(_REGISTRY, _register_permllm)


def _register_permllm(_registry) -> None:
    if "optimum_permllm" in sys.modules:  # imported (or being imported) by the user: it registers itself
        return
    try:
        import optimum_permllm

        optimum_permllm.load()  # idempotent; needed where the import defers it (a process named like a command)
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
        spec = _spec_from_the_other_finders(name, path, target)
        if spec is None:  # not importable (yet): keep watching
            _watched[name] = callbacks
            return None
        if hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, callbacks)
        if not _watched:
            sys.meta_path.remove(_finder)
        return spec


def _spec_from_the_other_finders(name, path, target):
    """The spec the import system would use without this module's finder."""
    for finder in sys.meta_path:
        if finder is not _finder and hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, path, target)
            if spec is not None:
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
