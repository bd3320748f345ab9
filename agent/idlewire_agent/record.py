"""Plain data classes for the agent, without `dataclasses`.

`dataclasses` imports inspect, ast, dis and tokenize, which stay in the agent's memory for its
whole life: 1.4 MB of RSS on Debian trixie's Python 3.13, for a budget of 30 MB. The agent's
records need only what this gives them:

    class Quota(Record):
        monthly_bytes: int = 0
        names: list[str] = field(default_factory=list)   # a fresh list per instance

    Quota(10), Quota(monthly_bytes=10)    positional or keyword; a field without default is required
    a == b, repr(a), a.replace(x=1)       equality and repr over the fields; a changed copy

Fields are the annotated class attributes, in order, base classes first. Instances stay mutable
(and so unhashable), like a plain @dataclass.
"""

from __future__ import annotations


class Factory:
    """A default made fresh for each instance (dataclasses' `field(default_factory=...)`)."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def field(default_factory) -> Factory:
    return Factory(default_factory)


def _own_annotations(cls: type) -> dict:
    ann = cls.__dict__.get("__annotations__")  # noqa: RUF063 (inspect.get_annotations: the import this avoids)
    if ann is None and "__annotate__" in cls.__dict__:  # Python 3.14: annotations are made lazily
        ann = cls.__annotations__
    return ann or {}


class Record:
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            for name in _own_annotations(klass):
                if not name.startswith("_"):
                    names[name] = None
        cls._fields = tuple(names)

    def __init__(self, *args, **kwargs):
        cls = type(self)
        if len(args) > len(cls._fields):
            raise TypeError(f"{cls.__name__}() takes at most {len(cls._fields)} positional arguments")
        for name, value in zip(cls._fields, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for {name!r}")
            kwargs[name] = value
        for name in cls._fields:
            if name in kwargs:
                value = kwargs.pop(name)
            else:
                try:
                    value = getattr(cls, name)
                except AttributeError:
                    raise TypeError(f"{cls.__name__}() missing argument {name!r}") from None
                if isinstance(value, Factory):
                    value = value.make()
            setattr(self, name, value)
        if kwargs:
            raise TypeError(f"{cls.__name__}() got unexpected argument(s) {', '.join(map(repr, kwargs))}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # mutable, like @dataclass(eq=True)

    def replace(self, **changes) -> Record:
        """A copy with some fields changed (dataclasses.replace)."""
        return type(self)(**{**{n: getattr(self, n) for n in self._fields}, **changes})
