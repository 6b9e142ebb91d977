"""The contract every method adapter implements.

A method module under ``methods/`` defines one subclass of :class:`Method`, registers it with
``@METHODS.register("<name>")`` and ships ``conf/method/<name>.yaml`` holding the same parameters
with the same defaults as its ``Params`` dataclass.
"""
from __future__ import annotations

import abc
import dataclasses
import typing
from typing import Any, ClassVar, Mapping

from . import versions
from .types import CATEGORIES, SAMPLE_FIELDS, MethodOutput, Sample


class ParamError(ValueError):
    """A bad or unknown method parameter; the message lists the parameters that exist."""


def _coerce(owner: str, name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(owner, name, a, value)
            except ParamError as e:
                errors.append(str(e))
        raise ParamError(errors[0] if errors else f"{owner}: parameter '{name}' got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ParamError(f"{owner}: parameter '{name}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{owner}: parameter '{name}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(owner, name, inner, v) for v in value) if origin is tuple else [
            _coerce(owner, name, inner, v) for v in value
        ]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamError(f"{owner}: parameter '{name}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{owner}: parameter '{name}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{owner}: parameter '{name}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(f"{owner}: parameter '{name}' must be a string, got {value!r}")
        return value
    return value


# -- the libraries whose numerics define an edit ---------------------------------------------------
#: Every edit's input is decoded by these (harness.images: Pillow, and OpenCV for 16-bit colour).
INPUT_LIBRARIES = ("numpy", "pillow", "opencv")


class Method(abc.ABC):
    """A method adapter: turns a :class:`Sample` plus parameters into an edit.

    Class attributes:
      name: set by the registry.
      version: bump when the method's output for the same inputs changes (invalidates the cache).
      requires: sample fields the method needs; a sample lacking one is skipped with the reason.
      categories: edit categories the method handles (None = any). A filter, not an input: a
        sample of another category is skipped, but a sample with no category is edited by
        every method whose ``requires`` it meets (a method whose edit reads the category
        lists ``"category"`` in ``requires``).
      Params: a dataclass of parameters with defaults, mirrored by ``conf/method/<name>.yaml``.
      numeric_libraries: distributions whose numerics the output depends on; their installed
        versions (with :data:`INPUT_LIBRARIES`, and torch for ``uses_torch``) are part of every
        edit's cache key, so an upgrade recomputes instead of mixing two versions in one table.
      location_params: parameters that say where the method's inputs are on this machine (a
        folder), not what it computes: they stay in the cache key and the job id, and are left
        out of the tables' ``params`` column, so two machines write identical tables.
    """

    name: ClassVar[str] = "?"
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("source",)
    categories: ClassVar[tuple[str, ...] | None] = None
    # Runs torch (its CPU tensors are invisible to tracemalloc: the runner then measures peak RSS).
    uses_torch: ClassVar[bool] = False
    # The classical methods' stack (methods/_common.py: OpenCV, SciPy, scikit-image).
    numeric_libraries: ClassVar[tuple[str, ...]] = ("opencv", "scipy", "scikit-image")
    location_params: ClassVar[tuple[str, ...]] = ()

    @dataclasses.dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: "Method.Params | None" = None):
        self.params = params if params is not None else self.Params()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Params)]

    @classmethod
    def parse_params(cls, values: Mapping[str, Any]) -> "Method.Params":
        """Validate and coerce a mapping of parameters; unknown names fail listing known ones."""
        hints = typing.get_type_hints(cls.Params)
        known = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            listing = ", ".join(f"{n} (default {_default(f)!r})" for n, f in known.items()) or "(none)"
            raise ParamError(
                f"method '{cls.name}' has no parameter(s) {', '.join(unknown)}; its parameters: {listing}"
            )
        kwargs = {k: _coerce(f"method '{cls.name}'", k, hints[k], v) for k, v in values.items()}
        try:
            return cls.Params(**kwargs)
        except (TypeError, ValueError) as e:
            raise ParamError(f"method '{cls.name}': {e}") from None

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> "Method":
        return cls(cls.parse_params(values))

    def resolved_params(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self.params).items()}

    # -- hooks ----------------------------------------------------------------------------
    def label(self) -> str:
        """The method's name in tables (a method may report itself under a user-given label)."""
        return self.name

    @classmethod
    def library_versions(cls) -> dict[str, str | None]:
        """Installed versions of the libraries that define this method's output (cache key)."""
        names = {*INPUT_LIBRARIES, *cls.numeric_libraries, *(("torch",) if cls.uses_torch else ())}
        return versions.library_versions(names)

    def model_revision(self) -> str | None:
        """Revision of the weights this method uses (part of the cache key); None if none."""
        return None

    def prepare(self) -> None:
        """Load models once per process; timed as preparation. Raise to skip the whole method."""

    def weights_status(self) -> list[tuple[str, str | None]]:
        """The weights this method needs, without loading them: ``(what, problem)`` pairs where
        ``problem`` is None when present here, else why not and how to provide them.
        ``edit-harness weights EXPERIMENT`` prints these. Methods without weights return []."""
        return []

    def check(self, sample: Sample) -> str | None:
        """Reason this sample cannot be handled (beyond ``requires``/``categories``), or None."""
        return None

    def cannot_handle(self, sample: Sample) -> str | None:
        """The skip reason the runner records, or None when the method can edit the sample."""
        missing = sample.missing(self.requires)
        if missing:
            return f"method '{self.name}' needs sample field(s) {', '.join(missing)}, which sample '{sample.id}' lacks"
        if self.categories is not None and sample.category is not None and sample.category not in self.categories:
            return (
                f"method '{self.name}' handles categories {', '.join(self.categories)}; "
                f"sample '{sample.id}' is '{sample.category}'"
            )
        return self.check(sample)

    @abc.abstractmethod
    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        """Edit one sample. Return an RGB uint8 image of the source's size.

        Raise :class:`harness.types.SkipSample` for a sample that cannot be handled.
        """

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        for f in cls.__dict__.get("requires", ()):
            if f not in SAMPLE_FIELDS:
                raise TypeError(f"{cls.__name__}.requires names unknown sample field '{f}'")
        for c in cls.__dict__.get("categories", None) or ():
            if c not in CATEGORIES:
                raise TypeError(f"{cls.__name__}.categories names unknown category '{c}'")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v
