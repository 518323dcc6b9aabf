"""The policy interface and the registry of policies by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from lodestar.cluster_view import ClusterView, Decision, RequestInfo


@runtime_checkable
class Policy(Protocol):
    """Chooses a worker for a request from what a router can see. No I/O, no waiting."""

    name: str

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """Pick one of `view`'s workers for `request`."""
        ...


PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy constructible by `make_policy(name)`."""

    def deco(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    import dispatcher.policies.analytic  # noqa: F401
    import dispatcher.policies.baselines  # noqa: F401
    import dispatcher.policies.learned  # noqa: F401
    import dispatcher.policies.learned_prior  # noqa: F401


def policy_names() -> list[str]:
    """Names of every registered policy."""
    _load_builtin()
    return sorted(_REGISTRY)


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Build the policy called `name`; keyword arguments go to its constructor."""
    _load_builtin()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**kwargs)
