"""Prompt templates: versioned conversations rendered by Jinja2 in a sandbox.

A template is a name with versions; each version declares its variables and the messages it
renders. Templates live in a directory of YAML files, one file per template, read and
compiled once at start-up; versions stored in Redis (`strata:templates:<name>`, a hash of
version -> JSON) add to them at runtime and win over a file's version of the same number.

    name: support_answer
    versions:
      "1":
        description: Answers a support question from the retrieved documents.
        variables:
          - {name: question, type: string}                 # required: no default
          - {name: tone, type: string, default: friendly}  # optional: has a default
          - {name: documents, type: list, default: []}
        messages:
          - {role: system, content: "You are a {{ tone }} support agent."}
          - role: user
            content: |
              {% for d in documents %}[{{ loop.index }}] {{ d.text }}
              {% endfor %}Question: {{ question }}

Versions are quoted strings (YAML reads `1.10` unquoted as the number 1.1); the latest is
the highest in numeric-aware order (1 < 2 < 10, 1.2 < 1.10). Variable types are string,
integer, number, boolean, list and object; `required` defaults to true unless a `default`
is given, and an optional variable without a default is null (it renders as nothing).
Messages may only use declared variables (checked when a template is loaded or stored).
Whole numbers from the request's Struct (which carries every number as a double) are
integers, so 3 renders as 3, not 3.0. The orchestrator's `extra` values (the retrieved
`documents`) fill declared variables the request left unset.

Rendering a request's `TemplateRef`:

    unknown name or version              NOT_FOUND          TEMPLATE_NOT_FOUND
    missing, undeclared or mistyped      INVALID_ARGUMENT   REQUEST_INVALID, one field violation
      variable                                              per `template.variables.<name>`
    the template fails or is refused     INVALID_ARGUMENT   TEMPLATE_INVALID
    Redis does not answer                UNAVAILABLE        REDIS_UNAVAILABLE

Templates run in Jinja2's immutable sandbox with strict undefined and no autoescaping (the
output is plain text). The sandbox refuses access to internals (`__class__`, `_private`,
function globals) and changes to the variables; on top of it, a render has limits
(`RenderLimits`): its output, the loop iterations, calls and filters it runs, the text it
builds on the way (expression results, literal text repeated by loops, list and dict
literals), its duration, and the widths and repeat counts of the operations that can
multiply text in one step (`*`, `**`, `%` and `format` widths, `center`, `indent`, `join`,
`replace`, `wordwrap`, `range`...). The one global is a capped `range`: `lipsum`,
`cycler`, `joiner`, `namespace` (shared mutable state) and `dict` are gone, and so are the
`random` (a prompt must render the same twice), `urlize` and `xmlattr` filters. Includes,
imports and `extends` are refused: a template is self-contained. Rendering runs on the event
loop (templates are compiled once, a render takes microseconds); the time limit bounds what
a template gone wrong can take from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import redis.asyncio as redis
import yaml
from google.protobuf import json_format
from jinja2 import Environment, StrictUndefined, TemplateError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_eval_context
from jinja2.visitor import NodeTransformer
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from services.common.errors import FieldViolation, RequestInvalid, TemplateNotFound
from services.common.redis_state import redis_errors
from services.common.settings import ConfigError
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

REDIS_PREFIX = "strata:templates:"
"""Runtime versions of template `<name>` live in the hash `strata:templates:<name>`."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_SOURCE_CHARS = 100_000
"""The most template text (all messages of a version) a version may hold."""
COMPILED_CACHE_SIZE = 512
"""Compiled Redis versions kept per process (file versions are always kept)."""

VariableType = Literal["string", "integer", "number", "boolean", "list", "object"]
_ROLES: dict[str, common_pb2.Role] = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}
_RESERVED_NAMES = frozenset({"range", "loop", "self", "caller", "varargs", "kwargs"})
"""Names Jinja gives a meaning to; a variable may not hide them."""
_REMOVED_FILTERS = ("random", "urlize", "xmlattr")
_LOADING_NODES = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """The messages a template rendered, and which version rendered them."""

    name: str
    version: str
    messages: list[common_pb2.ChatMessage]
    prompt_hash: str
    """SHA-256 (hex) of the rendered messages' roles and contents."""


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What one render may use; past a limit it fails with TEMPLATE_INVALID."""

    output_bytes: int = 1_000_000
    """The rendered messages together, in UTF-8 bytes."""
    steps: int = 50_000
    """Loop iterations, calls and filter applications."""
    work_chars: int = 8_000_000
    """Characters of text built on the way: expression outputs (also those captured by
    `set` blocks and macros), literal text repeated by loops, call and filter results,
    list and dict literals, and the estimated results of operations that multiply text."""
    seconds: float = 0.5
    """Wall-clock time, checked at every step."""
    max_range: int = 10_000
    """Items of one `range(...)`."""
    max_width: int = 10_000
    """Widths, counts and repeats given to padding, batching and formatting."""
    max_int_bits: int = 4096
    """Size of an integer built by `*` or `**`."""


def version_key(version: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Numeric-aware order of versions: runs of digits compare as numbers (2 < 10,
    1.2 < 1.10), other runs as text; the version itself breaks ties ("01" vs "1")."""
    parts = tuple(
        (0, int(digits), "") if digits else (1, 0, text)
        for digits, text in re.findall(r"(\d+)|(\D+)", version)
    )
    return parts, version


# --- The specification of a version, as written in a file or given to put() ---------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _VariableSpec(_Strict):
    name: str
    type: VariableType
    required: bool | None = None
    default: Any = None
    description: str = ""


class _MessageSpec(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class _VersionSpec(_Strict):
    description: str = ""
    variables: list[_VariableSpec] = Field(default_factory=list)
    messages: list[_MessageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _sizes(self) -> _VersionSpec:
        size = sum(len(m.content) for m in self.messages)
        if size > MAX_SOURCE_CHARS:
            raise ValueError(f"the messages hold {size} characters; at most {MAX_SOURCE_CHARS}")
        return self


_VersionName = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]


class _TemplateFile(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    versions: dict[_VersionName, _VersionSpec] = Field(min_length=1)


class _SpecError(Exception):
    """A version's specification is invalid; the message says why."""


class _WrongType(Exception):
    """A value does not have its variable's type; the message says what it should be."""


def _coerce(kind: str, value: Any) -> Any:
    """The value as a variable of this type holds it, or _WrongType."""
    if kind == "string" and isinstance(value, str):
        return str(value)
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind in ("integer", "number") and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            if kind == "number":
                return value
            # JSON does not tell 3 from 3.0: a whole number is an integer.
            if value.is_integer():
                return int(value)
            raise _WrongType(f"must be an integer, not {value!r}")
    if kind == "list" and isinstance(value, list | tuple):
        return list(value)
    if kind == "object" and isinstance(value, Mapping):
        return dict(value)
    article = "an" if kind[0] in "aeiou" else "a"
    raise _WrongType(f"must be {article} {kind}, not {_json_type(value)}")


def _whole_numbers(value: Any) -> Any:
    """JSON from a Struct, whose numbers are all doubles, with whole numbers as integers
    (a client's 3 renders as 3, not 3.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number" if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class _Variable:
    name: str
    type: str
    required: bool
    default: Any


@dataclass(frozen=True, slots=True)
class _CompiledMessage:
    role: common_pb2.Role
    template: Any  # jinja2.Template; typed loosely as Jinja's own stubs type it loosely


@dataclass(frozen=True, slots=True)
class _CompiledVersion:
    name: str
    version: str
    variables: dict[str, _Variable]
    messages: tuple[_CompiledMessage, ...]
    source: bytes
    """The version's specification as canonical JSON (what put() stores in Redis)."""

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _canonical(spec: _VersionSpec) -> bytes:
    """The specification as compact JSON with sorted keys, as given (unset fields left out)."""
    document = spec.model_dump(mode="json", exclude_unset=True)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- The sandbox -------------------------------------------------------------------------


class _LimitExceeded(SecurityError):
    """A render went past one of its RenderLimits."""


class _Budget:
    """What is left of one render's limits."""

    __slots__ = ("chars", "deadline", "limits", "steps")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = limits.steps
        self.chars = limits.work_chars
        self.deadline = time.monotonic() + limits.seconds

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _LimitExceeded(
                f"runs more than {self.limits.steps} loop iterations, calls and filters"
            )
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"takes longer than {self.limits.seconds:g} s")

    def charge(self, chars: int) -> None:
        self.chars -= max(chars, 0)
        if self.chars < 0:
            raise _LimitExceeded(f"builds more than {self.limits.work_chars} characters of text")


_BUDGET: ContextVar[_Budget | None] = ContextVar("strata_template_budget", default=None)


def _budget() -> _Budget:
    """The running render's budget. Outside a render (Jinja folding constants while it
    compiles) nothing may run: the refusal makes Jinja leave the work to the render."""
    budget = _BUDGET.get()
    if budget is None:
        raise SecurityError("template code runs only while rendering")
    return budget


def _measure(value: Any, limit: int) -> tuple[int, int]:
    """About how many characters `value` takes as text (counting up to just past `limit`),
    and how deeply its lists and dicts nest."""
    size, depth = 0, 0
    todo = [(value, 1)]
    while todo and size <= limit:
        item, level = todo.pop()
        depth = max(depth, level)
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, list | tuple):
            size += 2 + 2 * len(item)
            todo.extend((child, level + 1) for child in item)
        elif isinstance(item, dict):
            size += 2 + 4 * len(item)
            todo.extend((child, level + 1) for pair in item.items() for child in pair)
        else:
            size += 8
    return size, depth


def _size(value: Any, limit: int) -> int:
    return _measure(value, limit)[0]


def _shallow_size(value: Any) -> int:
    if isinstance(value, str | list | tuple | dict):
        return len(value)
    return 0


def _finalize(value: Any) -> str:
    """Every `{{ expression }}` output: charged to the render; null prints as nothing."""
    budget = _budget()
    text = "" if value is None else str(value)
    budget.charge(len(text))
    return text


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")


class _PromptEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with the render limits enforced at every hook it offers."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, limits: RenderLimits) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=False,
            finalize=_finalize,
            # No compile-time evaluation: everything a template computes is charged.
            optimized=False,
            auto_reload=False,
            cache_size=0,
        )
        self.limits = limits
        self.globals.clear()
        self.globals["range"] = self.strata_range
        for name in _REMOVED_FILTERS:
            del self.filters[name]
        self.filters["join"] = _join_filter(self.filters["join"])
        for name, func in list(self.filters.items()):
            self.filters[name] = _guarded_filter(self, name, func)

    # Helpers the instrumented templates call (see _Instrument); templates cannot name them.

    def strata_range(self, *args: int) -> range:
        """The templates' `range`."""
        items = range(*args)
        try:
            count = len(items)
        except OverflowError:
            count = self.limits.max_range + 1
        if count > self.limits.max_range:
            raise _LimitExceeded(f"range() of more than {self.limits.max_range} items")
        return items

    def strata_loop(self, iterable: Any, literal_chars: int) -> Iterator[Any]:
        """A `for` loop's items, each a step that repeats the body's literal text."""
        budget = _budget()
        for item in iterable:
            budget.step()
            budget.charge(literal_chars)
            yield item

    def strata_concat(self, *parts: Any) -> str:
        """The `~` operator."""
        text = "".join(map(str, parts))
        _budget().charge(len(text))
        return text

    def strata_literal(self, value: Any) -> Any:
        """A list, tuple or dict literal, charged whole: nesting literals multiplies them."""
        budget = _budget()
        budget.charge(_size(value, budget.chars))
        return value

    def check_width(self, width: Any, what: str) -> int:
        """Refuses a width or count above the limit; the usable value (0 if not an int)."""
        if isinstance(width, int) and width > self.limits.max_width:
            raise _LimitExceeded(f"{what} of {width}; at most {self.limits.max_width}")
        return max(width, 0) if isinstance(width, int) else 0

    # Sandbox hooks.

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        if owner is self:
            return context.call(obj, *args, **kwargs)
        budget = _budget()
        budget.step()
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, str):
                budget.charge(len(arg))
        if isinstance(owner, str | int | float | list | tuple | dict):
            args = self._check_method(budget, owner, obj.__name__, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        budget.charge(_shallow_size(result))
        return result

    def _check_method(
        self, budget: _Budget, owner: Any, method: str, args: tuple[Any, ...], kwargs: Any
    ) -> tuple[Any, ...]:
        if isinstance(owner, str):
            allowed = _STR_METHODS
        elif isinstance(owner, dict):
            allowed = frozenset({"get", "items", "keys", "values"})
        elif isinstance(owner, list | tuple):
            allowed = frozenset({"index", "count"})
        else:
            allowed = frozenset({"is_integer"})
        if method not in allowed:
            raise SecurityError(f"{type(owner).__name__}.{method}() is not allowed in templates")
        if method in ("center", "ljust", "rjust", "zfill") and args:
            self.check_width(args[0], f"str.{method} width")
        elif method == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            budget.charge(_replace_size(owner, args[0], args[1], count))
        elif method == "join" and args:
            items = list(args[0])
            budget.charge(len(owner) * max(len(items) - 1, 0))
            return (items, *args[1:])
        return args

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        sequences = str | list | tuple
        if operator == "*":
            if isinstance(left, int) and isinstance(right, sequences):
                left, right = right, left
            if isinstance(left, sequences) and isinstance(right, int):
                self.check_width(right, "repeat count")
                budget.charge(_size(left, budget.chars) * max(right, 0))
            elif isinstance(left, int) and isinstance(right, int):
                self._check_bits(left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                self._check_bits(right * left.bit_length())
        elif operator == "+":
            if isinstance(left, sequences):
                budget.charge(_size(left, budget.chars) + _size(right, budget.chars))
        elif operator == "%" and isinstance(left, str):
            self._check_percent_format(left)
        result = super().call_binop(context, operator, left, right)
        if operator == "%":
            budget.charge(_shallow_size(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_brace_format(value.__self__)
        return wrapped

    def _check_bits(self, bits: int) -> None:
        if bits > self.limits.max_int_bits:
            raise _LimitExceeded(f"an integer of {bits} bits; at most {self.limits.max_int_bits}")

    def _check_percent_format(self, fmt: str) -> None:
        for width, precision in _PERCENT_SPEC.findall(fmt):
            for number in (width, precision):
                if number == "*":
                    raise SecurityError("'*' widths are not allowed in templates")
                if number:
                    self.check_width(int(number), "format width")

    def _check_brace_format(self, fmt: str) -> None:
        for _, _, spec, _ in string.Formatter().parse(fmt):
            if not spec:
                continue
            if "{" in spec:
                raise SecurityError("nested format fields are not allowed in templates")
            for number in re.findall(r"\d+", spec):
                self.check_width(int(number), "format width")


_STR_METHODS = frozenset(
    """
    capitalize casefold center count endswith find index isalnum isalpha isascii isdecimal
    isdigit islower isnumeric isspace istitle isupper join ljust lower lstrip partition
    removeprefix removesuffix replace rfind rindex rjust rpartition rsplit rstrip split
    splitlines startswith strip swapcase title upper zfill
    """.split()  # noqa: SIM905 (a word list reads better than 39 quoted lines)
)
"""str methods a template may call (`format` is Jinja's own sandboxed formatter)."""


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    text, old, new = str(text), str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _join_filter(join: Callable[..., str]) -> Callable[..., str]:
    """`join`, charged for its separator before it runs (its input may be a generator)."""

    @pass_eval_context
    def strata_join(
        eval_ctx: nodes.EvalContext, value: Any, d: str = "", attribute: Any = None
    ) -> str:
        items = list(value)
        _budget().charge(len(str(d)) * max(len(items) - 1, 0))
        return join(eval_ctx, items, d, attribute)

    return strata_join


def _guarded_filter(
    env: _PromptEnvironment, name: str, func: Callable[..., Any]
) -> Callable[..., Any]:
    """A filter that counts as a step, is checked before it runs when it can multiply text,
    and whose result is charged."""
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)  # keeps Jinja's pass_context/pass_eval_context marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if check is not None:
            first = 0
            while first < len(args) and isinstance(
                args[first], Context | nodes.EvalContext | Environment
            ):
                first += 1
            check(env, budget, _Args(args[first:], kwargs))
        result = func(*args, **kwargs)
        budget.charge(_shallow_size(result))
        return result

    return guarded


class _Args:
    """A filter's arguments after the value, by position or name."""

    __slots__ = ("kwargs", "positional")

    def __init__(self, positional: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.positional = positional
        self.kwargs = kwargs

    def get(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.positional):
            return self.positional[index]
        return self.kwargs.get(name, default)


def _check_center(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    env.check_width(a.get(1, "width", 80), "center width")


def _check_indent(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    width = a.get(1, "width", 4)
    per_line = len(width) if isinstance(width, str) else env.check_width(width, "indent")
    text = str(a.get(0, "s", ""))
    budget.charge(len(text) + (text.count("\n") + 1) * per_line)


def _check_replace(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    count = a.get(3, "count")
    budget.charge(_replace_size(a.get(0, "s"), a.get(1, "old"), a.get(2, "new"), count))


def _check_wordwrap(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    text = str(a.get(0, "s", ""))
    wrap = a.get(3, "wrapstring") or env.newline_sequence
    budget.charge(len(text) + (len(text) + 1) * len(str(wrap)))


def _check_format(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    env._check_percent_format(str(a.get(0, "value", "")))


def _check_fill(what: str, count_name: str) -> Callable[[_PromptEnvironment, _Budget, _Args], None]:
    def check(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
        count = env.check_width(a.get(1, count_name, 1), what)
        fill = a.get(2, "fill_with")
        if fill is not None:
            budget.charge(_size(fill, budget.chars) * count)

    return check


def _check_tojson(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    indent = a.get(1, "indent")
    if not indent:
        return
    per_level = len(indent) if isinstance(indent, str) else env.check_width(indent, "indent")
    size, depth = _measure(a.get(0, "value"), budget.chars)
    budget.charge(size * (1 + per_level * depth))


def _check_sum(env: _PromptEnvironment, budget: _Budget, a: _Args) -> None:
    start = a.get(2, "start", 0)
    if not isinstance(start, int | float):
        raise SecurityError("sum() adds numbers only")


_FILTER_CHECKS: dict[str, Callable[[_PromptEnvironment, _Budget, _Args], None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "replace": _check_replace,
    "wordwrap": _check_wordwrap,
    "format": _check_format,
    "batch": _check_fill("batch size", "linecount"),
    "slice": _check_fill("slice count", "slices"),
    "tojson": _check_tojson,
    "sum": _check_sum,
}


class _Instrument(NodeTransformer):
    """Routes the work no sandbox hook sees through the environment's charged helpers:
    loop iterations (with the literal text each one repeats), `~` and list, tuple and dict
    literals."""

    def __init__(self, env: _PromptEnvironment) -> None:
        self.env = env

    def _call(self, helper: str, args: list[Any], lineno: int) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(helper), args, [], None, None)
        return call.set_lineno(lineno).set_environment(self.env)  # type: ignore[return-value]

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        literal = sum(len(d.data) for s in node.body for d in s.find_all(nodes.TemplateData))
        node.iter = self._call("strata_loop", [node.iter, nodes.Const(literal)], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return self._call("strata_concat", node.nodes, node.lineno)

    def _literal(self, node: nodes.List | nodes.Tuple | nodes.Dict) -> nodes.Expr:
        self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":
            return node
        return self._call("strata_literal", [node], node.lineno)

    visit_List = _literal
    visit_Tuple = _literal
    visit_Dict = _literal


# --- The store ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice (a copied version block whose number was not
    changed would otherwise silently replace the first)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    keys = [loader.construct_object(key) for key, _ in node.value]
    for index, key in enumerate(keys):
        if key in keys[:index]:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", node.start_mark
            )
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def _describe(err: ValidationError) -> str:
    return "; ".join(
        ".".join(str(part) for part in problem["loc"]) + ": " + problem["msg"]
        if problem["loc"]
        else problem["msg"]
        for problem in err.errors()
    )


def _prompt_hash(messages: Iterable[common_pb2.ChatMessage]) -> str:
    canonical = json.dumps(
        [[int(m.role), m.content] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TemplateStore:
    """Prompt templates from a directory of YAML files, plus runtime versions in Redis."""

    def __init__(
        self,
        directory: Path | None,
        client: redis.Redis | None = None,
        *,
        limits: RenderLimits | None = None,
    ) -> None:
        """Reads and compiles every template file in `directory` (None: no files); a
        ConfigError names the file and the problem. `client`: Redis for runtime versions."""
        self._client = client
        self._env = _PromptEnvironment(limits or RenderLimits())
        self._files: dict[str, dict[str, _CompiledVersion]] = {}
        self._stored: dict[str, set[str]] = {}
        """Versions this process has written to or read from Redis, by name."""
        self._compiled: OrderedDict[tuple[str, str, str], _CompiledVersion] = OrderedDict()
        if directory is not None:
            self._load_directory(directory)

    def versions(self, name: str) -> list[str]:
        """The versions known for `name`, oldest first: the files' ones and those this
        process has stored in or read from Redis; [] for an unknown name."""
        known = set(self._files.get(name, {})) | self._stored.get(name, set())
        return sorted(known, key=version_key)

    async def render(
        self, ref: orchestrator_pb2.TemplateRef, extra: Mapping[str, Any] | None = None
    ) -> RenderedPrompt:
        """Renders the template `ref` names with its variables. `extra` fills declared
        variables the request left unset (the orchestrator's retrieved `documents`); its
        other keys are ignored."""
        if not ref.name:
            raise RequestInvalid.field("template.name", "is required")
        compiled = await self._resolve(ref.name, ref.version)
        given = _whole_numbers(json_format.MessageToDict(ref.variables))
        variables = self._bind(compiled, given, extra or {})
        messages = self._render_messages(compiled, variables)
        return RenderedPrompt(
            name=compiled.name,
            version=compiled.version,
            messages=messages,
            prompt_hash=_prompt_hash(messages),
        )

    async def put(self, name: str, version: str, spec: Mapping[str, Any]) -> None:
        """Validates a version as files are validated and stores it in Redis, where it wins
        over a file's version of the same number. INVALID_ARGUMENT/TEMPLATE_INVALID when
        it is invalid."""
        if self._client is None:
            raise RuntimeError("storing templates needs a Redis client")
        violations = []
        if not _NAME.fullmatch(name):
            violations.append(FieldViolation("name", f"must match {NAME_PATTERN}"))
        if not _VERSION.fullmatch(version):
            violations.append(FieldViolation("version", f"must match {VERSION_PATTERN}"))
        if violations:
            raise RequestInvalid(violations, reason="TEMPLATE_INVALID")
        try:
            compiled = self._compile(name, version, _VersionSpec.model_validate(dict(spec)))
        except ValidationError as err:
            raise RequestInvalid.field("spec", _describe(err), reason="TEMPLATE_INVALID") from err
        except _SpecError as err:
            raise RequestInvalid.field("spec", str(err), reason="TEMPLATE_INVALID") from err
        with redis_errors():
            await self._client.hset(REDIS_PREFIX + name, version, compiled.source)
        self._remember(compiled, hashlib.sha256(compiled.source).hexdigest())

    # Loading.

    def _load_directory(self, directory: Path) -> None:
        if not directory.is_dir():
            raise ConfigError(f"templates directory {directory} does not exist")
        defined_in: dict[str, Path] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix not in (".yaml", ".yml") or not path.is_file():
                continue
            name, versions = self._load_file(path)
            if name in defined_in:
                raise ConfigError(
                    f"template file {path}: template {name!r} is already defined in "
                    f"{defined_in[name]}"
                )
            defined_in[name] = path
            self._files[name] = versions

    def _load_file(self, path: Path) -> tuple[str, dict[str, _CompiledVersion]]:
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read template file {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(
                f"invalid template file {path}: expected a mapping with a name and versions"
            )
        for key in raw.get("versions") or {}:
            if not isinstance(key, str):
                raise ConfigError(
                    f"invalid template file {path}: version {key!r} must be a quoted string "
                    '(write "1.10", not 1.10, which YAML reads as the number 1.1)'
                )
        try:
            spec = _TemplateFile.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(f"invalid template file {path}: {_describe(err)}") from err
        versions = {}
        for version, version_spec in spec.versions.items():
            try:
                versions[version] = self._compile(spec.name, version, version_spec)
            except _SpecError as err:
                raise ConfigError(
                    f"invalid template file {path}: {spec.name}@{version}: {err}"
                ) from err
        return spec.name, versions

    def _compile(self, name: str, version: str, spec: _VersionSpec) -> _CompiledVersion:
        variables: dict[str, _Variable] = {}
        for index, declared in enumerate(spec.variables):
            where = f"variables[{index}] ({declared.name})"
            if not _IDENTIFIER.fullmatch(declared.name) or declared.name in _RESERVED_NAMES:
                raise _SpecError(f"{where}: not a valid variable name")
            if declared.name in variables:
                raise _SpecError(f"{where}: declared twice")
            has_default = "default" in declared.model_fields_set
            required = not has_default if declared.required is None else declared.required
            if required and has_default:
                raise _SpecError(f"{where}: a required variable takes no default")
            default = None
            if declared.default is not None:
                try:
                    default = _coerce(declared.type, declared.default)
                except _WrongType as err:
                    raise _SpecError(f"{where}: the default {err}") from err
            variables[declared.name] = _Variable(declared.name, declared.type, required, default)
        messages = []
        for index, message in enumerate(spec.messages):
            where = f"messages[{index}]"
            try:
                tree = self._env.parse(message.content)
                loader = next(tree.find_all(_LOADING_NODES), None)
                if loader is not None:
                    raise _SpecError(
                        f"{where}: line {loader.lineno}: a template is self-contained; "
                        "include, import and extends are not supported"
                    )
                unknown = (
                    meta.find_undeclared_variables(tree)
                    - variables.keys()
                    - self._env.globals.keys()
                )
                if unknown:
                    raise _SpecError(
                        f"{where} uses undeclared variables: {', '.join(sorted(unknown))}"
                    )
                _Instrument(self._env).visit(tree)
                template = self._env.from_string(tree)
            except TemplateError as err:
                line = getattr(err, "lineno", None)
                raise _SpecError(f"{where}: {f'line {line}: ' if line else ''}{err}") from err
            messages.append(_CompiledMessage(_ROLES[message.role], template))
        return _CompiledVersion(
            name=name,
            version=version,
            variables=variables,
            messages=tuple(messages),
            source=_canonical(spec),
        )

    # Lookup.

    async def _resolve(self, name: str, version: str) -> _CompiledVersion:
        """The version asked for (empty: the latest), Redis first."""
        if not _NAME.fullmatch(name) or (version and not _VERSION.fullmatch(version)):
            raise TemplateNotFound(name, version)
        files = self._files.get(name, {})
        chosen, raw = version, None
        if self._client is not None:
            key = REDIS_PREFIX + name
            with redis_errors():
                if not version:
                    fields = await self._client.hkeys(key)
                    stored = {v for v in map(_text, fields) if _VERSION.fullmatch(v)}
                    self._stored.setdefault(name, set()).update(stored)
                    chosen = max(stored | files.keys(), key=version_key, default="")
                    if chosen in stored:
                        raw = await self._client.hget(key, chosen)
                else:
                    raw = await self._client.hget(key, version)
        elif not version:
            chosen = max(files, key=version_key, default="")
        if raw is not None:
            return self._from_redis(name, chosen, raw if isinstance(raw, bytes) else raw.encode())
        if chosen in files:
            return files[chosen]
        raise TemplateNotFound(name, version)

    def _from_redis(self, name: str, version: str, raw: bytes) -> _CompiledVersion:
        self._stored.setdefault(name, set()).add(version)
        digest = hashlib.sha256(raw).hexdigest()
        cached = self._compiled.get((name, version, digest))
        if cached is not None:
            self._compiled.move_to_end((name, version, digest))
            return cached
        try:
            compiled = self._compile(name, version, _VersionSpec.model_validate(json.loads(raw)))
        except (ValueError, _SpecError) as err:  # ValidationError and JSON errors are ValueErrors
            log.warning("template %s@%s stored in Redis is invalid: %s", name, version, err)
            raise RequestInvalid.field(
                "template",
                f"{name}@{version} stored in Redis is invalid",
                reason="TEMPLATE_INVALID",
            ) from err
        self._remember(compiled, digest)
        return compiled

    def _remember(self, compiled: _CompiledVersion, digest: str) -> None:
        self._stored.setdefault(compiled.name, set()).add(compiled.version)
        self._compiled[(compiled.name, compiled.version, digest)] = compiled
        self._compiled.move_to_end((compiled.name, compiled.version, digest))
        while len(self._compiled) > COMPILED_CACHE_SIZE:
            self._compiled.popitem(last=False)

    # Rendering.

    @staticmethod
    def _bind(
        compiled: _CompiledVersion, given: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        violations = [
            FieldViolation(
                f"template.variables.{name}", f"is not a variable of template {compiled.label}"
            )
            for name in sorted(given.keys() - compiled.variables.keys())
        ]
        values: dict[str, Any] = {}
        for variable in compiled.variables.values():
            value = given.get(variable.name)
            if value is None:
                value = extra.get(variable.name)
            field = f"template.variables.{variable.name}"
            if value is None:
                if variable.required:
                    violations.append(
                        FieldViolation(field, f"is required by template {compiled.label}")
                    )
                values[variable.name] = variable.default
                continue
            try:
                values[variable.name] = _coerce(variable.type, value)
            except _WrongType as err:
                violations.append(FieldViolation(field, str(err)))
        if violations:
            raise RequestInvalid(violations)
        return values

    def _render_messages(
        self, compiled: _CompiledVersion, variables: dict[str, Any]
    ) -> list[common_pb2.ChatMessage]:
        limits = self._env.limits
        budget = _Budget(limits)
        token = _BUDGET.set(budget)
        produced = 0
        messages = []
        try:
            for index, message in enumerate(compiled.messages):
                parts = []
                with closing(message.template.generate(variables)) as chunks:
                    for chunk in chunks:
                        produced += len(chunk)
                        if produced > limits.output_bytes:
                            raise _LimitExceeded(f"renders more than {limits.output_bytes} bytes")
                        parts.append(chunk)
                content = "".join(parts)
                if not content and message.role != common_pb2.ROLE_ASSISTANT:
                    raise _template_invalid(compiled, f"rendered messages[{index}] empty")
                messages.append(common_pb2.ChatMessage(role=message.role, content=content))
        except RequestInvalid:
            raise
        except SecurityError as err:
            raise _template_invalid(compiled, f"was refused: {err}") from err
        except TemplateError as err:
            raise _template_invalid(compiled, f"failed to render: {err}") from err
        except Exception as err:  # any Python error a template's expression raised
            raise _template_invalid(
                compiled, f"failed to render: {type(err).__name__}: {err}"
            ) from err
        finally:
            _BUDGET.reset(token)
        size = sum(len(m.content.encode()) for m in messages)
        if size > limits.output_bytes:
            raise _template_invalid(
                compiled, f"was refused: renders more than {limits.output_bytes} bytes"
            )
        return messages


def _template_invalid(compiled: _CompiledVersion, what: str) -> RequestInvalid:
    if len(what) > 300:
        what = what[:297] + "..."
    return RequestInvalid.field("template", f"{compiled.label} {what}", reason="TEMPLATE_INVALID")
