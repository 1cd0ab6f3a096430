"""The algorithm registry: ``algorithm:`` name -> class, filled by :func:`register`.

An algorithm registers itself in its own module with the :func:`register` decorator;
:mod:`fedsim.algorithms` imports every module of the package once, so a new file is found without
being listed anywhere. From the registry come the ``algorithm:`` names the config accepts, the
dry run's traffic (each class's :meth:`~fedsim.algorithms.base.Algorithm.traffic`) and the
contract test over every algorithm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from fedsim.algorithms.base import Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}
"""``algorithm:`` name -> class, in registration order."""

A = TypeVar("A", bound="type[Algorithm]")


def register(cls: A) -> A:
    """Class decorator: add ``cls`` to :data:`ALGORITHMS` under ``cls.name``.

    Raises:
        ValueError: another class is registered under the same name.
    """
    other = ALGORITHMS.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(
            f"algorithm name {cls.name!r} is registered twice ({other.__module__}.{other.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__}); give one of them another name"
        )
    ALGORITHMS[cls.name] = cls
    return cls
