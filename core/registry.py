"""Name -> class registries for methods, datasets and encoders (timm-style decorators).

A new method is one file with one decorated class::

    @METHODS.register("my_method")
    class MyMethod(Method): ...

The built-in packages are imported on first lookup, and so are the modules that third-party
packages declare under the ``mmbalance.plugins`` entry-point group.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from mmbalance.core.errors import ConfigError, PluginWarning, allowed_list, closest

T = TypeVar("T")

_BUILTIN_PACKAGES = ("mmbalance.methods", "mmbalance.datasets", "mmbalance.models")

log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """A named table of classes; `kind` is used in error messages ("method", "dataset", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice: {existing} and {cls}")
            self._entries[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    @contextlib.contextmanager
    def registered(self, name: str, cls: type[T]) -> Iterator[type[T]]:
        """`cls` registered as `name` inside the block only (a test's throw-away class, which must
        not leak into what other code lists: `mmbalance init` writes a cell per method)."""
        self.register(name)(cls)
        try:
            yield cls
        finally:
            self._entries.pop(name, None)

    def get(self, name: str, where: str = "") -> type[T]:
        load_all()
        try:
            return self._entries[name]
        except KeyError:
            src = f" (in {where})" if where else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{src}{closest(name, self._entries)}; "
                f"allowed: {allowed_list(self._entries)}"
            ) from None

    def params_of(self, section: Mapping[str, Any], where: str = "") -> Any:
        """The typed Params of the class `section["name"]` names, from the section's other keys
        (a config section such as `method: {name: mla, hgm: off}`)."""
        cls = self.get(section["name"], where)
        return cls.Params.model_validate({k: v for k, v in section.items() if k != "name"})

    def create(self, section: Mapping[str, Any], *args: Any, where: str = "") -> T:
        """timm's `create_model` for this registry: the class `section["name"]` names, built from
        its typed Params (the section's other keys) and `args` (what the harness hands it)."""
        return self.get(section["name"], where)(self.params_of(section, where), *args)

    def names(self) -> list[str]:
        load_all()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, type[T]]]:
        load_all()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        load_all()
        return name in self._entries


METHODS: Registry = Registry("method")
DATASETS: Registry = Registry("dataset")
ENCODERS: Registry = Registry("encoder")

_loaded = False


def load_all() -> None:
    """Import every built-in module and plugin once, so that their decorators run."""
    global _loaded  # the import side effect is process-wide by nature; this only memoises it
    if _loaded:
        return
    _loaded = True
    for package_name in _BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") and info.name not in ("base", "prepare"):
                importlib.import_module(f"{package_name}.{info.name}")
    for ep in entry_points(group="mmbalance.plugins"):
        load_plugin(ep)


def load_plugin(ep: EntryPoint) -> None:
    """Import one plugin entry point, written `package.module` or `package.module:Class` (loading
    the object imports its module, which registers its classes). A plugin that fails to import
    is a warning naming it, so that one broken package does not break every command."""
    try:
        ep.load()
    except Exception as e:  # any error in a third party's module code, not only ImportError
        warnings.warn(f"plugin {ep.name!r} ({ep.value}) of the mmbalance.plugins entry points failed to "
                      f"load and is skipped: {type(e).__name__}: {e}", PluginWarning, stacklevel=2)
    else:
        log.debug(f"plugin {ep.name!r} ({ep.value}) loaded")
