"""Options checked by declared type and range, in one place.

Every number a user passes — a command-line option (``--targets``, ``--lr``), a field of a
configuration (:class:`~ggda.models.training.TrainConfig`, :class:`~ggda.gold.GoldConfig`,
:class:`~ggda.runs.DataSpec`, ...) or a method option (``--opt damping=0.01``) — goes through
:func:`check` with a :class:`Spec` (its type and range). Bad values (``nan``, ``inf``, a negative
count, zero where zero means nothing, ``abc`` for an integer) become one :class:`GGDAError` line that
names the option and what it must be, before any work starts, on the command line and in the
Python API alike.

Method options are specified by the method's constructor: :func:`method_option_spec` reads the
annotation (``int``, ``float``, ``bool``, ``str``, ``... | None``) and the default, and applies the
library's conventions for ranges (counts are ``>= 1``, seeds ``>= 0``, real numbers finite and
``>= 0``; :data:`POSITIVE_OPTIONS` must be ``> 0``); a method may refine them with a class
attribute ``option_specs = {"name": Spec(...)}``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ggda.errors import GGDAError

__all__ = [
    "COUNT",
    "FRACTION",
    "NONNEG",
    "NONNEG_INT",
    "OptionDoc",
    "POSITIVE",
    "PROBABILITY",
    "Spec",
    "check",
    "check_fields",
    "check_each",
    "check_method",
    "check_method_options",
    "flag_of",
    "method_description",
    "method_option_docs",
    "method_option_spec",
    "method_summary",
    "parse_scalar",
]


@dataclass(frozen=True)
class Spec:
    """The declared type and range of one option.

    ``kind``: ``int``, ``float``, ``bool`` or ``str``. ``low``/``high``: bounds (``None``: open),
    exclusive when ``low_open``/``high_open``. ``none``: ``None`` is allowed (not given / automatic).
    ``choices``: the allowed strings.
    """

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False
    choices: tuple[str, ...] | None = None

    def optional(self) -> Spec:
        return replace(self, none=True)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        what = {int: "an integer", float: "a finite number", bool: "true or false", str: "text"}[self.kind]
        if self.kind in (int, float):
            lo = None if self.low is None else f"{'>' if self.low_open else '>='} {_num(self.low)}"
            hi = None if self.high is None else f"{'<' if self.high_open else '<='} {_num(self.high)}"
            if lo and hi:
                what += f" {lo} and {hi}"
            elif lo or hi:
                what += f" {lo or hi}"
        return what


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


COUNT = Spec(int, 1)  # how many of something: at least one
NONNEG_INT = Spec(int, 0)  # seeds, offsets, "0 = automatic / none"
POSITIVE = Spec(float, 0, low_open=True)  # learning rates, tolerances, budgets
NONNEG = Spec(float, 0)  # damping, weight decay
FRACTION = Spec(float, 0, 1, low_open=True, high_open=True)  # strictly between 0 and 1
PROBABILITY = Spec(float, 0, 1)  # 0..1 inclusive


def flag_of(name: str) -> str:
    """The command-line flag of option ``name`` (``weight_decay`` -> ``--weight-decay``)."""
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def _fail(name: str, value: Any, spec: Spec, flag: str | None, context: str) -> GGDAError:
    shown = value if isinstance(value, str) else repr(value)
    if flag is None or flag == name:
        label = f"{name} {shown}" if name.startswith("-") else f"{name}={shown}"
    else:
        label = f"{name}={shown} ({flag})"
    return GGDAError(f"{context}{label} is not valid: it must be {spec.describe()}.")


def parse_scalar(raw: str) -> Any:
    """``"0.01"`` -> 0.01, ``"5"`` -> 5, ``"true"`` -> True, ``"none"`` -> None, else the string."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def check(name: str, value: Any, spec: Spec, flag: str | None = None, context: str = "") -> Any:
    """``value`` converted to ``spec.kind`` when it satisfies ``spec``; else one GGDAError line
    naming ``name`` (and the command-line ``flag``) and what the value must be."""
    if value is None:
        if spec.none:
            return None
        raise _fail(name, value, spec, flag, context)
    if isinstance(value, str) and spec.kind is not str:
        value = parse_scalar(value)
        if value is None:
            if spec.none:
                return None
            raise _fail(name, "none", spec, flag, context)
    kind = spec.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _fail(name, value, spec, flag, context)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _fail(name, value, spec, flag, context)
        value = str(value)
        if spec.choices is not None and value not in spec.choices:
            raise _fail(name, value, spec, flag, context)
        return value
    if isinstance(value, bool) or not _is_number(value):
        raise _fail(name, value, spec, flag, context)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(name, value, spec, flag, context)
    if kind is int:
        if not number.is_integer():
            raise _fail(name, value, spec, flag, context)
        value = int(number) if not isinstance(value, int) else int(value)
    else:
        value = number
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        raise _fail(name, value, spec, flag, context)
    if spec.high is not None and (value > spec.high or (spec.high_open and value == spec.high)):
        raise _fail(name, value, spec, flag, context)
    return value


def _is_number(value: Any) -> bool:
    try:
        import numpy as np

        if isinstance(value, np.integer | np.floating):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, int | float)


def check_fields(
    obj: Any, specs: Mapping[str, Spec], context: str = "", flags: Mapping[str, str] | None = None
) -> None:
    """Check (and convert in place) the fields of a configuration object by their specs; the
    message names the field and its command-line flag (``--field-name`` unless ``flags`` says)."""
    flags = flags or {}
    for name, spec in specs.items():
        value = check(name, getattr(obj, name), spec, flag=flags.get(name, flag_of(name)), context=context)
        object.__setattr__(obj, name, value)


def check_each(name: str, values: Iterable, spec: Spec, flag: str | None = None) -> list:
    """Every entry of a list option (``--fractions 0.1,0.2``) by ``spec``."""
    return [check(name, v, spec, flag=flag) for v in values]


# -- method options -------------------------------------------------------------------------------

#: Real-valued method options that must be strictly positive (a zero tolerance never stops, a zero
#: memory budget holds nothing, a zero scale divides by zero).
POSITIVE_OPTIONS = frozenset({"tol", "memory_mb", "cache_mb", "scale"})

_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _annotation_kinds(annotation: Any, default: Any) -> tuple[set, bool, bool]:
    """(scalar kinds, None allowed, anything non-scalar allowed) of a constructor parameter."""
    if annotation is inspect.Parameter.empty:
        if default is None or default is inspect.Parameter.empty:
            return set(), True, True
        return {type(default)}, False, False
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds, none, other = set(), False, False
    for part in text.replace("Optional[", "").replace("]", "").split("|"):
        part = part.strip()
        if part == "None":
            none = True
        elif part in _SCALARS:
            kinds.add(_SCALARS[part])
        else:
            other = True
    if default is None:
        none = True
    return kinds, none, other


def _constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``cls``'s constructor, following ``**options`` up the class chain."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init).parameters.values()
        for p in sig:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "task"):
                params.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig):
            break
    return params


def method_option_spec(cls: type, name: str) -> Spec | None:
    """The spec of option ``name`` of method class ``cls`` (``None``: not a scalar option, e.g.
    ``checkpoints``, which only the Python API or the run provides)."""
    declared = {}
    for klass in reversed(cls.__mro__):
        declared.update(getattr(klass, "option_specs", None) or {})
    if name in declared:
        return declared[name]
    param = _constructor_params(cls).get(name)
    if param is None:
        return None
    kinds, none, other = _annotation_kinds(param.annotation, param.default)
    if not kinds:
        return None
    if int in kinds and float in kinds:
        kinds = {float}
    kind = next(iter(kinds)) if len(kinds) == 1 else (str if str in kinds else next(iter(kinds)))
    if other and kind is str:
        return None
    if kind is int:
        seed_like = name == "seed" or name.endswith("_seed")
        spec = NONNEG_INT if seed_like else COUNT
    elif kind is float:
        spec = POSITIVE if name in POSITIVE_OPTIONS else NONNEG
    else:
        spec = Spec(kind)
    return replace(spec, none=none)


def check_method_options(cls: type, options: Mapping[str, Any], method: str | None = None) -> dict:
    """``options`` converted and checked against method ``cls``'s constructor (see the module
    docstring); a value of a non-scalar option (``checkpoints``) given as text is refused."""
    method = method or getattr(cls, "name", cls.__name__)
    out = dict(options)
    for name, value in options.items():
        spec = method_option_spec(cls, name)
        if spec is None:
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                raise GGDAError(
                    f"Option {name}={value} of method '{method}' cannot be given as text; it is set "
                    "from the run (checkpoints, models) or through the Python API."
                )
            continue
        out[name] = check(name, value, spec, flag=f"--opt {name}=...", context=f"Method '{method}': ")
    return out


def check_method(name: str, options: Mapping[str, Any]) -> dict:
    """The options of registered method ``name`` checked before it is built (for commands that
    build methods later, after other work): the name, unknown options, types and ranges."""
    import ggda.methods  # noqa: F401  (registers every method)
    from ggda.methods.base import METHODS, method_options

    if name not in METHODS:
        raise GGDAError(f"Unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    unknown = sorted(set(options) - method_options(cls))
    if unknown:
        raise GGDAError(
            f"Method '{name}' has no option {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(method_options(cls)))}."
        )
    return check_method_options(cls, options, name)


# -- method option documentation ------------------------------------------------------------------


@dataclass(frozen=True)
class OptionDoc:
    """One method option as ``ggda methods NAME`` shows it: derived from the constructor (name,
    default), the declared :class:`Spec` (what a value must be) and the ``Args:`` section of the
    class docstrings (meaning) — nothing is listed twice by hand."""

    name: str
    kind: str  # what a value must be (Spec.describe), or how the option is set
    default: str
    meaning: str


def docstring_args(doc: str | None) -> dict[str, str]:
    """``{name: text}`` from a Google-style ``Args:`` section (continuation lines joined; an entry
    ``a, b: text`` documents both; ``**options`` is skipped)."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    inside, indent, current = False, None, None
    for line in lines:
        stripped = line.strip()
        if not inside:
            inside = stripped == "Args:"
            continue
        if not stripped:
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the section ended
            break
        if indent is None:
            indent = depth
        head, sep, text = stripped.partition(":")
        if depth == indent and sep and all(p.strip().isidentifier() for p in head.split(",")):
            current = [p.strip() for p in head.split(",")]
            for name in current:
                out[name] = text.strip()
        elif depth == indent and stripped.startswith("**"):
            current = None
        elif current:
            for name in current:
                out[name] = f"{out[name]} {stripped}".strip()
    return out


def method_summary(cls: type) -> str:
    """The first paragraph of a method's docstring, joined into one line (never cut)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(doc.split("\n\n", 1)[0].split())


def method_description(cls: type) -> str:
    """A method's docstring without its ``Args:`` section (that becomes the option table)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    kept, skipping = [], False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            skipping = True
            continue
        if skipping and line and not line[0].isspace():
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip()


def method_option_docs(cls: type) -> list[OptionDoc]:
    """Every option of method class ``cls`` (constructor order), with its declared type and
    range, its default and the meaning documented in the ``Args:`` sections up the class chain."""
    meanings: dict[str, str] = {}
    for klass in cls.__mro__:
        for name, text in docstring_args(klass.__dict__.get("__doc__")).items():
            meanings.setdefault(name, text)
    docs = []
    for name, param in _constructor_params(cls).items():
        spec = method_option_spec(cls, name)
        kind = spec.describe() if spec is not None else "set by the run or the Python API"
        if spec is not None and spec.none:
            kind += " or none"
        default = "required" if param.default is inspect.Parameter.empty else repr(param.default)
        docs.append(OptionDoc(name, kind, default, meanings.get(name, "")))
    return docs
