"""The typed per-process services container behind `Runtime.services`.

Owns: `ServiceKey[T]` (a typed name for one shared service, aiohttp's `AppKey` idea: a
policy declares its key beside the service's class, so `services[KEY]` is typed as that
class), `Services` (the container), and `StatusProvider` (what `/readyz` and
`/_edge/status` iterate: a name and a `status()` document).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, final

T = TypeVar("T")


@final
class ServiceKey(Generic[T]):
    """The name of one per-process service; `T` is the type stored under it. Keys compare
    by identity, so two modules cannot collide by choosing the same string."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"ServiceKey({self.name!r})"


class StatusProvider(Protocol):
    """A section of `/_edge/status` and a check of `/readyz`, under `name`."""

    @property
    def name(self) -> str: ...

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class StatusFn:
    """A StatusProvider for state that has no object of its own (a few shared dicts)."""

    name: str
    fn: Callable[[], dict[str, Any]]

    def status(self) -> dict[str, Any]:
        return self.fn()


class Services:
    """Services created lazily by the policies that need them (one per process), and the
    status providers, in registration order."""

    def __init__(self) -> None:
        self._items: dict[ServiceKey[Any], Any] = {}
        self._status: dict[str, StatusProvider] = {}

    def __getitem__(self, key: ServiceKey[T]) -> T:
        value: T = self._items[key]
        return value

    def __setitem__(self, key: ServiceKey[T], value: T) -> None:
        self._items[key] = value

    def __contains__(self, key: ServiceKey[Any]) -> bool:
        return key in self._items

    def get(self, key: ServiceKey[T]) -> T | None:
        value: T | None = self._items.get(key)
        return value

    def setdefault(self, key: ServiceKey[T], default: T) -> T:
        value: T = self._items.setdefault(key, default)
        return value

    def get_or_create(self, key: ServiceKey[T], factory: Callable[[], T]) -> T:
        """The service under `key`, made by `factory` on first use."""
        if key in self._items:
            return self[key]
        value = self._items[key] = factory()
        return value

    def add_status(self, provider: StatusProvider) -> None:
        """Register a status provider; the first one under a name stays (several routes
        of one policy share it)."""
        self._status.setdefault(provider.name, provider)

    def status(self, name: str) -> dict[str, Any]:
        """The status document of the provider registered under `name`."""
        return self._status[name].status()

    def status_providers(self) -> Iterator[StatusProvider]:
        return iter(list(self._status.values()))
