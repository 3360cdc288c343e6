"""GitHub Actions expressions (`${{ ... }}`), evaluated as the Actions runner does, for the rehearsal.

The subset the project's workflows may use (anything else is an `ExpressionError` that names it):
literals (`null`, `true`, `false`, numbers, `'strings'` with `''` for a quote), context access
(`a.b`, `a['b']`, `a.*.b`), `!`, `<`, `<=`, `>`, `>=`, `==`, `!=`, `&&`, `||`, parentheses and the
functions `contains`, `startsWith`, `endsWith`, `format`, `join`, `toJSON`, `fromJSON`,
`hashFiles`, `success`, `always`, `failure`, `cancelled`.

Semantics follow GitHub's documentation ("Evaluate expressions in workflows and actions"): `&&`
and `||` return one of their operands; falsy values are `null`, `false`, `0`, `-0`, `NaN` and
`''`; `==` between different types compares numbers (null -> 0, booleans -> 1/0, strings parsed,
unparsable -> NaN); strings compare case-insensitively; a missing property is `null`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mla_zoo.modeling.common import MlaZooError

EXPRESSION = re.compile(r"\$\{\{((?:(?!\}\}).)*)\}\}", re.S)
_TOKEN = re.compile(r"""\s*(?:
    (?P<num>0x[0-9a-fA-F]+|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^']|'')*')
  | (?P<op>==|!=|<=|>=|&&|\|\||[!<>()\[\],.*])
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
)""", re.X)
STATUS_FUNCTIONS = ("success", "always", "failure", "cancelled")


class ExpressionError(MlaZooError):
    """An expression the rehearsal cannot evaluate (a syntax error, or a function it does not know)."""


@dataclass
class Scope:
    """What an expression sees: the contexts (github, env, vars, ...) and the job's status so far."""

    contexts: Mapping[str, Any]
    failed: bool = False  # a previous step (or a needed job) failed: success() is false, failure() true
    workspace: Path | None = None  # for hashFiles
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- values


def truthy(value: Any) -> bool:
    if value is None or value is False or value == "":
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return not (value == 0 or math.isnan(value))
    return True


def to_number(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return 0.0
        try:
            return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
        except ValueError:
            return math.nan
    return math.nan


def to_string(value: Any) -> str:
    """How a value is written into a string (`run:` text, env values, `format`)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return "Array"
    if isinstance(value, Mapping):
        return "Object"
    return str(value)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, (Mapping, list, tuple)) or isinstance(b, (Mapping, list, tuple)):
        return a is b
    if type(a) is type(b) and not isinstance(a, (int, float)):
        return a == b
    x, y = to_number(a), to_number(b)
    return x == y  # NaN never equals anything


def _compare(a: Any, b: Any, op: str) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        x, y = a.lower(), b.lower()
    else:
        x, y = to_number(a), to_number(b)
        if math.isnan(x) or math.isnan(y):
            return False
    return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op]


def _property(value: Any, key: Any) -> Any:
    if isinstance(value, Mapping):
        if isinstance(key, str):
            for k, v in value.items():  # property names are case-insensitive
                if isinstance(k, str) and k.lower() == key.lower():
                    return v
        return None
    if isinstance(value, (list, tuple)):
        index = to_number(key)
        if not math.isnan(index) and index.is_integer() and 0 <= int(index) < len(value):
            return value[int(index)]
    return None


def _format(template: Any, *args: Any) -> str:
    text, out, i = to_string(template), [], 0
    while i < len(text):
        if text.startswith("{{", i) or text.startswith("}}", i):
            out.append(text[i])
            i += 2
        elif text[i] == "{":
            end = text.find("}", i)
            index = text[i + 1:end] if end > 0 else ""
            if not index.isdigit() or int(index) >= len(args):
                raise ExpressionError(f"format({text!r}): no argument for {{{index}}}")
            out.append(to_string(args[int(index)]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _contains(search: Any, item: Any) -> bool:
    if isinstance(search, (list, tuple)):
        return any(_equal(x, item) for x in search)
    return to_string(item).lower() in to_string(search).lower()


def _hash_files(scope: Scope, *patterns: Any) -> str:
    root = scope.workspace or Path.cwd()
    files = sorted({p for pattern in patterns for p in root.glob(to_string(pattern)) if p.is_file()})
    if not files:
        return ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "contains": _contains,
    "startswith": lambda s, v: to_string(s).lower().startswith(to_string(v).lower()),
    "endswith": lambda s, v: to_string(s).lower().endswith(to_string(v).lower()),
    "format": _format,
    "join": lambda items, sep=",": (to_string(sep).join(to_string(x) for x in items)
                                    if isinstance(items, (list, tuple)) else to_string(items)),
    "tojson": lambda v: json.dumps(v, indent=2),
    "fromjson": lambda v: json.loads(to_string(v)),
}


# ----------------------------------------------------------------------------- parsing


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ExpressionError(f"cannot read the expression {text!r} at {text[pos:pos + 12]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over the precedence levels: || < && < == != < comparisons < ! < access."""

    def __init__(self, text: str, scope: Scope):
        self.text, self.scope, self.tokens, self.i = text, scope, _tokens(text), 0

    def peek(self, value: str | None = None) -> bool:
        return self.i < len(self.tokens) and (value is None or self.tokens[self.i][1] == value)

    def take(self, value: str | None = None) -> tuple[str, str]:
        if not self.peek(value):
            found = self.tokens[self.i][1] if self.i < len(self.tokens) else "the end"
            raise ExpressionError(f"in {self.text.strip()!r}: expected {value or 'a value'}, found {found!r}")
        self.i += 1
        return self.tokens[self.i - 1]

    def parse(self) -> Any:
        value = self.or_()
        if self.i != len(self.tokens):
            raise ExpressionError(f"in {self.text.strip()!r}: unexpected {self.tokens[self.i][1]!r}")
        return value

    def or_(self) -> Any:
        value = self.and_()
        while self.peek("||"):
            self.take()
            right = self.and_()
            value = value if truthy(value) else right
        return value

    def and_(self) -> Any:
        value = self.equality()
        while self.peek("&&"):
            self.take()
            right = self.equality()
            value = right if truthy(value) else value
        return value

    def equality(self) -> Any:
        value = self.comparison()
        while self.peek("==") or self.peek("!="):
            op = self.take()[1]
            right = self.comparison()
            value = _equal(value, right) == (op == "==")
        return value

    def comparison(self) -> Any:
        value = self.unary()
        while any(self.peek(op) for op in ("<", "<=", ">", ">=")):
            op = self.take()[1]
            value = _compare(value, self.unary(), op)
        return value

    def unary(self) -> Any:
        if self.peek("!"):
            self.take()
            return not truthy(self.unary())
        return self.access()

    def access(self) -> Any:
        value, spread = self.primary(), False
        while self.peek(".") or self.peek("["):
            if self.take()[1] == ".":
                if self.peek("*"):
                    self.take()
                    value = list(value.values()) if isinstance(value, Mapping) else list(value or [])
                    spread = True
                    continue
                key = self.take()[1]
            else:
                key = self.or_()
                self.take("]")
            value = [_property(v, key) for v in value] if spread else _property(value, key)
        return value

    def primary(self) -> Any:
        kind, text = self.take()
        if kind == "num":
            return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if text == "(":
            value = self.or_()
            self.take(")")
            return value
        if kind != "name":
            raise ExpressionError(f"in {self.text.strip()!r}: unexpected {text!r}")
        if text in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[text]
        if self.peek("("):
            return self.call(text)
        for name, value in self.scope.contexts.items():
            if name.lower() == text.lower():
                return value
        raise ExpressionError(f"in {self.text.strip()!r}: unknown context {text!r} (the rehearsal knows "
                              f"{', '.join(self.scope.contexts)})")

    def call(self, name: str) -> Any:
        self.take("(")
        args = []
        while not self.peek(")"):
            args.append(self.or_())
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        key = name.lower()
        if key in STATUS_FUNCTIONS:
            failed = self.scope.failed
            return {"success": not failed, "always": True, "failure": failed, "cancelled": False}[key]
        if key == "hashfiles":
            return _hash_files(self.scope, *args)
        function = self.scope.functions.get(key) or FUNCTIONS.get(key)
        if function is None:
            raise ExpressionError(f"in {self.text.strip()!r}: the rehearsal does not know the function {name}()")
        return function(*args)


# ----------------------------------------------------------------------------- use


def evaluate(expression: str, scope: Scope) -> Any:
    """The value of one expression (the text inside `${{ }}`)."""
    return _Parser(expression, scope).parse()


def substitute(value: Any, scope: Scope) -> Any:
    """A workflow value with its `${{ }}` evaluated: a string that is exactly one expression gives the
    expression's value (a list for `runs-on`, a list of objects for a matrix); other strings get each
    expression written in as text; lists and mappings are substituted item by item."""
    if isinstance(value, str):
        whole = EXPRESSION.fullmatch(value.strip())
        if whole:
            return evaluate(whole.group(1), scope)
        return EXPRESSION.sub(lambda m: to_string(evaluate(m.group(1), scope)), value)
    if isinstance(value, list):
        return [substitute(v, scope) for v in value]
    if isinstance(value, Mapping):
        return {k: substitute(v, scope) for k, v in value.items()}
    return value


def condition(text: Any, scope: Scope) -> bool:
    """An `if:` (with or without `${{ }}`); without a status function it means `success() && (...)`."""
    if text is None:
        return not scope.failed
    if isinstance(text, bool):
        return text and not scope.failed
    expression = str(text).strip()
    whole = EXPRESSION.fullmatch(expression)
    if whole:
        expression = whole.group(1)
    elif "${{" in expression:
        return truthy(substitute(expression, scope)) and not scope.failed
    uses_status = any(re.search(rf"\b{f}\s*\(", expression, re.I) for f in STATUS_FUNCTIONS)
    value = truthy(evaluate(expression, scope))
    return value if uses_status else value and not scope.failed
