"""Schemas: the declared shape of the JSON files autoprec reads back (plan.json, profile.json).

A hand-edited or damaged file must fail on load with one line that names the file, the field (a
JSON path such as ``decisions[3].format``) and what was expected -- not with a KeyError, a traceback
or, worst, a silently wrong value (a NaN amax in a profile became an fp8 scale of 1.0). Each kind of
file declares its fields once, as a tree of small specs (:class:`Num`, :class:`Str`, :class:`Obj`,
...) in a :class:`Document` that also carries its version and its error class; the document reads
and parses a file, and its :meth:`Document.check` is the first thing a ``from_dict`` does. Whether a
valid file fits a particular model (fingerprint and layer names) is a separate question, asked by
:func:`check_fits` once the model is known.
No dependency (jsonschema is not one) and no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn

from autoprec.core.errors import AutoprecError, UsageError
from autoprec.core.formats import Precision
from autoprec.core.opgraph import OpGraph


class Violation(Exception):
    """One value that breaks its spec, at a JSON path; a :class:`Document` turns it into its one-line error."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or 'top level'}: {message}")


def show(value: Any) -> str:
    """A JSON value as a message quotes it: short, and in JSON's words (null, NaN, an object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = json.dumps(value)
        return "the string " + (text if len(text) <= 40 else text[:36] + '..."')
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def join(path: str, key: str | int) -> str:
    """``path`` extended by a list index (``a[3]``) or an object key: ``a.b``, or ``a["/x.y"]`` for a
    key that is no identifier (ONNX node names)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _IDENTIFIER.fullmatch(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


# --- specs -----------------------------------------------------------------------------------
class Spec:
    """A check of one JSON value; :attr:`expected` says in words what it accepts, for messages."""

    @property
    def expected(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, path: str) -> None:
        """Raise :class:`Violation` unless ``value`` (found at ``path``) is valid."""
        raise NotImplementedError

    def fail(self, value: Any, path: str, detail: str = "") -> NoReturn:
        raise Violation(path, f"got {show(value)}{detail}, expected {self.expected}")


@dataclass(frozen=True)
class Num(Spec):
    """A JSON number (never true/false, never NaN) in ``[lo, hi]``; ``inf`` admits infinities, which
    an error measure legitimately reaches when a format overflows."""

    lo: float | None = None
    hi: float | None = None
    inf: bool = False

    @property
    def expected(self) -> str:
        text = "a number" if self.inf else "a finite number"
        if self.lo is not None and self.hi is not None:
            text += f" in [{self.lo:g}, {self.hi:g}]"
        elif self.lo is not None:
            text += f" >= {self.lo:g}"
        elif self.hi is not None:
            text += f" <= {self.hi:g}"
        return text + (" (Infinity allowed, NaN not)" if self.inf else "")

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            self.fail(value, path)
        if (math.isinf(value) and not self.inf) or (self.lo is not None and value < self.lo) or (
                self.hi is not None and value > self.hi):
            self.fail(value, path)


@dataclass(frozen=True)
class Int(Spec):
    """A JSON integer (1.0 and true are not) of at least ``lo``."""

    lo: int = 0

    @property
    def expected(self) -> str:
        return f"an integer >= {self.lo}"

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.lo:
            self.fail(value, path)


@dataclass(frozen=True)
class Bool(Spec):
    """true or false."""

    @property
    def expected(self) -> str:
        return "true or false"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            self.fail(value, path)


@dataclass(frozen=True)
class Str(Spec):
    """A string, optionally non-empty or matching ``pattern`` in full (``what`` then names it in messages)."""

    nonempty: bool = False
    pattern: str | None = None
    what: str = ""

    @property
    def expected(self) -> str:
        return self.what or ("a non-empty string" if self.nonempty else "a string")

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str) or (self.nonempty and not value) or (
                self.pattern is not None and not re.fullmatch(self.pattern, value)):
            self.fail(value, path)


@dataclass(frozen=True)
class OneOf(Spec):
    """One of a fixed set of strings (a format name, a mode)."""

    values: tuple[str, ...]

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(self.values)

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str) or value not in self.values:
            self.fail(value, path)


@dataclass(frozen=True)
class Regex(Spec):
    """A Python regular expression (a pin's pattern): a broken one fails on load, not at matching."""

    @property
    def expected(self) -> str:
        return "a Python regular expression"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            self.fail(value, path)
        try:
            re.compile(value)
        except re.error as e:
            self.fail(value, path, f" ({e})")


@dataclass(frozen=True)
class Nullable(Spec):
    """null or what ``spec`` accepts."""

    spec: Spec

    @property
    def expected(self) -> str:
        return f"null or {self.spec.expected}"

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            self.spec.check(value, path)


@dataclass(frozen=True)
class ListOf(Spec):
    """A list of ``item``s; ``unique`` names an object field no two items may share (a plan's layer)."""

    item: Spec
    unique: str | None = None

    @property
    def expected(self) -> str:
        return "a list"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            self.fail(value, path)
        seen: set[Any] = set()
        for i, x in enumerate(value):
            self.item.check(x, join(path, i))
            if self.unique is not None:
                key = x[self.unique]
                if key in seen:
                    raise Violation(join(join(path, i), self.unique),
                                    f"got {show(key)} a second time, expected each {self.unique} once")
                seen.add(key)


@dataclass(frozen=True)
class MapOf(Spec):
    """An object with free keys (layer names, format names) checked by ``key`` and values by ``value``."""

    value: Spec
    key: Spec = Str(nonempty=True)

    @property
    def expected(self) -> str:
        return "an object"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            self.fail(value, path)
        for k, v in value.items():
            self.key.check(k, join(path, k))
            self.value.check(v, join(path, k))


@dataclass(frozen=True)
class Obj(Spec):
    """An object with named fields: ``required`` ones, ``optional`` ones, and no others unless
    ``open`` (a misspelt optional field would otherwise be ignored and its default used silently).
    ``keys_of`` maps a map field to another whose keys it must draw its own from (a profile's
    ``ranges`` describe layers its ``errors`` have)."""

    required: Mapping[str, Spec] = field(default_factory=dict)
    optional: Mapping[str, Spec] = field(default_factory=dict)
    open: bool = False
    keys_of: Mapping[str, str] = field(default_factory=dict)

    @property
    def expected(self) -> str:
        return "an object"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            self.fail(value, path)
        for name, spec in self.required.items():
            if name not in value:
                raise Violation(join(path, name), f"missing, expected {spec.expected}")
        known = {**self.required, **self.optional}
        if not self.open:
            for name in value:
                if name not in known:
                    raise Violation(join(path, name), f"unknown field, expected one of {', '.join(sorted(known))}")
        for name, spec in known.items():
            if name in value:
                spec.check(value[name], join(path, name))
        for name, ref in self.keys_of.items():
            for k in value.get(name, {}):
                if k not in value[ref]:
                    raise Violation(join(join(path, name), k), f"layer {json.dumps(k)} is not in {ref}, "
                                                               f"expected only layers of {ref}")


#: a format as files spell it (the canonical name; the CLI's aliases such as "fp8" are for people typing)
FORMAT = OneOf(tuple(p.value for p in Precision))
#: an OpGraph fingerprint; empty in a hand-written file, which then skips the fingerprint check
FINGERPRINT = Str(pattern="[0-9a-f]*", what="a fingerprint (lowercase hex digits, or empty)")


# --- documents -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One kind of file autoprec reads back: its name in messages, its fields, its version, and the
    error class its problems raise.

    ``unversioned`` is the version a file without a ``version`` field is read as, for a kind of file
    that once had none (None: such a file is an error). A version above ``version`` was written by a
    newer autoprec and says so; any other one is simply invalid.
    """

    what: str
    version: int
    error: type[AutoprecError]
    schema: Obj
    unversioned: int | None = None

    def _name(self, source: str | None) -> str:
        return f"{self.what} {source}" if source else self.what

    def read(self, path: str | os.PathLike[str]) -> Any:
        """The parsed JSON of the file at ``path`` (not yet checked: :meth:`check` is the loader's)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError) as e:  # a path the user typed: a usage error
            raise UsageError(f"cannot read {self.what} {path}: {e.strerror}") from None
        except OSError as e:
            raise self.error(f"cannot read {self.what} {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise self.error(f"{self._name(str(path))} is not a JSON text file (not UTF-8)") from None
        return self.parse(text, str(path))

    def parse(self, text: str, source: str | None = None) -> Any:
        """JSON ``text`` parsed (``source``, e.g. its path, names it in messages); not yet checked."""
        if not text.strip():
            raise self.error(f"{self._name(source)} is not valid JSON: it is empty")
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            # the parser stopped at the end, or in a string that never closes: the file was cut short
            cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
            raise self.error(f"{self._name(source)} is not valid JSON: {e.msg} (line {e.lineno}, column "
                             f"{e.colno}){'; the text ends early: truncated?' if cut else ''}") from None

    def check(self, data: Any, source: str | None = None) -> None:
        """Raise this document's one-line error at the first violation in ``data`` (parsed JSON)."""
        try:
            if not isinstance(data, Mapping):
                raise Violation("", f"got {show(data)}, expected an object")
            if "version" not in data and self.unversioned is None:
                raise Violation("version", f"missing, expected {self.version}")
            version = data.get("version", self.unversioned)
            integer = isinstance(version, int) and not isinstance(version, bool)
            if integer and version > self.version:
                raise self.error(f"{self._name(source)} was written by a newer autoprec (version {version}; "
                                 f"this one reads version {self.version}): upgrade autoprec")
            if not integer or version != self.version:
                raise Violation("version", f"got {show(version)}, expected {self.version}")
            self.schema.check({k: v for k, v in data.items() if k != "version"}, "")
        except Violation as v:
            raise self.error(f"malformed {self._name(source)}: {v}") from None


# --- the model a file belongs to -------------------------------------------------------------
def check_fits(what: str, model_name: str, fingerprint: str, layers: list[str], graph: OpGraph,
               error: type[AutoprecError], redo: str) -> None:
    """Raise ``error`` unless a file made for ``model_name`` (its ``fingerprint`` and ``layers``) fits
    ``graph``: the same layer names, and, when the file records a fingerprint, the same kinds and
    shapes. ``redo`` is what to run again (``"the search"``)."""
    theirs = graph.layer_names()
    mine_set, theirs_set = set(layers), set(theirs)
    unknown = [n for n in layers if n not in theirs_set]
    missing = [n for n in theirs if n not in mine_set]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown layers {_names(unknown)}")
        if missing:
            parts.append(f"missing layers {_names(missing)}")
        raise error(f"{what} for {model_name or 'a model'} does not fit "
                    f"{graph.model_name or 'this model'}: {'; '.join(parts)}")
    if fingerprint and fingerprint != graph.fingerprint():
        raise error(f"{what} for {model_name or 'a model'} has the same layers as "
                    f"{graph.model_name or 'this model'} but other kinds or shapes "
                    f"(fingerprint {fingerprint} != {graph.fingerprint()}): re-run {redo}")


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
