"""One code path for the pipelines that take a typed config or, as before, its settings as keywords."""

from __future__ import annotations

from typing import Any, TypeVar

from neurospec.errors import NeurospecError

C = TypeVar("C")


class _Unset:
    """The default of a pipeline's setting keyword: not given (the config's default applies)."""

    def __repr__(self) -> str:
        return "<config default>"


UNSET: Any = _Unset()


def config_from(cls: type[C], cfg: C | None, keywords: dict[str, Any], pipeline: str) -> C:
    """``cfg``, or a ``cls`` built from the ``keywords`` that were given (the others keep the config's defaults);
    the config checks itself, so a bad setting fails here, before any model work."""
    given = {k: v for k, v in keywords.items() if v is not UNSET}
    if cfg is None:
        return cls(**given)
    if not isinstance(cfg, cls):
        raise NeurospecError(f"{pipeline}: cfg must be a {cls.__name__}, got {type(cfg).__name__}")
    if given:
        raise NeurospecError(f"{pipeline}: {', '.join(sorted(given))} given both as keywords and through cfg; "
                             f"put every setting in the {cls.__name__}")
    return cfg
