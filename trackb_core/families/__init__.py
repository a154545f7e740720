"""The task families and their registry: one module per family, one list of them.

Each module here (``docstring``, ``explain``, ``bugfix``, ``complete``, ``unit_test``)
holds everything about its family in one :class:`~trackb_core.families.base.Family`
(``FAMILY``). The registry is the one list of families: task building, the teachers,
the filters and the metrics loop over it, so the category list is derived from it
(:func:`names`), in registration order (the order tasks are built in).

Adding a family: write one module like these, add it to :data:`BUILTIN` (or, from a
plugin or a test, :func:`register` it, or use :func:`registered` for a while).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from trackb_core.families import bugfix, complete, docstring, explain, unit_test
from trackb_core.families.base import CheckContext, Family, FunctionSource, Metric

__all__ = ["BUILTIN", "CheckContext", "Family", "FunctionSource", "Metric", "all_families",
           "code_names", "get", "names", "register", "registered", "resolve", "unregister"]

# The families trackb ships, in the order their tasks are built per function.
BUILTIN: tuple[Family, ...] = (docstring.FAMILY, explain.FAMILY, bugfix.FAMILY,
                               complete.FAMILY, unit_test.FAMILY)

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (after the others) and return it.

    Raises ValueError if a family of that name is registered already, TypeError if
    ``family`` is not a :class:`Family` or leaves an attribute of the protocol unset.
    """
    if not isinstance(family, Family):
        raise TypeError(f"{family!r} is not a trackb_core.families.Family")
    missing = [name for name in Family.__annotations__ if not hasattr(family, name)]
    if missing:
        raise TypeError(f"family {getattr(family, 'name', family)!r} does not set "
                        f"{', '.join(missing)}")
    if family.name in _REGISTRY:
        raise ValueError(f"a task family named {family.name!r} is registered already")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove the family called ``name``. Raises KeyError if there is none."""
    del _REGISTRY[name]


@contextmanager
def registered(family: Family) -> Iterator[Family]:
    """Register ``family`` for the duration of a ``with`` block (tests, experiments).

    Raises what :func:`register` raises.
    """
    register(family)
    try:
        yield family
    finally:
        _REGISTRY.pop(family.name, None)


def all_families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """The category names of every registered family, in registration order."""
    return tuple(_REGISTRY)


def code_names() -> tuple[str, ...]:
    """The categories whose answer is code (:attr:`Family.answers_with_code`)."""
    return tuple(name for name, family in _REGISTRY.items() if family.answers_with_code)


def get(name: str) -> Family:
    """The family called ``name``. Raises ValueError naming the known ones if none is."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task category {name!r}; known: "
                         f"{', '.join(_REGISTRY)}") from None


def resolve(wanted: Iterable[str]) -> list[Family]:
    """The families named in ``wanted``, in registration order (repeats ignored).

    Raises ValueError naming the unknown ones.
    """
    wanted = list(wanted)
    unknown = sorted(set(wanted) - set(_REGISTRY))
    if unknown:
        raise ValueError(f"unknown task categories {unknown}; choose from {list(_REGISTRY)}")
    return [family for name, family in _REGISTRY.items() if name in set(wanted)]


for _family in BUILTIN:
    register(_family)
