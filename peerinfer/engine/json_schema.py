"""Bounds on a client's JSON schema before it becomes a grammar. Pure: no llama.cpp here.

A schema in ``response_format`` is someone else's input, and turning it into a grammar costs what it
says: llama-cpp-python's converter writes ``{"maxItems": 100000}`` as 100000 copies of the item rule
(llama.cpp copies them again when it parses the grammar), recurses once per level of nesting, and
fetches a ``$ref`` that is a URL when asserts are off. The grammar then runs for every token of the
answer. So a schema is checked here first, and what the converter would silently leave out (a
``minimum``, a ``required`` name without a property) is refused rather than answered with text that
does not match it.

``check_schema`` raises ``RequestError(param="response_format")`` naming the part, and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from peerinfer.errors import RequestError

PARAM = "response_format"
WHERE = "response_format.json_schema.schema"
MAX_DEPTH = 32  # objects and arrays inside one another
MAX_MEMBERS = 256  # properties, enum values, alternatives, tuple items and required names, in total
MAX_REPEAT = 1000  # minItems, maxLength, a pattern's {m,n}, ...: each is expanded into copies of a rule
MAX_PATTERN_CHARS = 1000
MAX_GRAMMAR_BYTES = 64 * 1024

_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
# Keywords that constrain the value but that the grammar cannot enforce: refused, not ignored.
_NOT_ENFORCED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "minProperties",
    "maxProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def refuse(path: str, why: str) -> RequestError:
    if len(path) > 160:
        path = f"{path[:60]}...{path[-90:]}"
    return RequestError(f"{path}: {why}", param=PARAM)


def check_schema(schema: object) -> None:
    """Raise ``RequestError`` if ``schema`` is not an object, is too big, or says what no grammar here enforces."""
    if not isinstance(schema, Mapping):
        raise refuse(WHERE, f"must be a JSON object (a JSON Schema), not {_kind(schema)}")
    members = 0
    # (node, path, depth, is a schema): iterative, so that nesting costs no Python recursion. Values of
    # enum, const, default, examples, ... are data: only their depth counts.
    stack: list[tuple[Any, str, int, bool]] = [(schema, WHERE, 1, True)]
    while stack:
        node, path, depth, is_schema = stack.pop()
        if depth > MAX_DEPTH:
            raise refuse(path, f"is nested {depth} levels deep; at most {MAX_DEPTH} are allowed")
        if not is_schema:
            if isinstance(node, Mapping):
                stack.extend((value, f"{path}.{key}", depth + 1, False) for key, value in node.items())
            elif isinstance(node, list):
                stack.extend((value, f"{path}[{index}]", depth + 1, False) for index, value in enumerate(node))
            continue
        if not isinstance(node, Mapping):
            raise refuse(path, f"must be a schema (a JSON object), not {_kind(node)}")
        members += _check_schema_object(node, path)
        if members > MAX_MEMBERS:
            raise refuse(WHERE, f"has more than {MAX_MEMBERS} properties, enum values, alternatives and items in all")
        stack.extend(_children(node, path, depth))


def _children(node: Mapping[Any, Any], path: str, depth: int) -> list[tuple[Any, str, int, bool]]:
    children: list[tuple[Any, str, int, bool]] = []
    for key, value in node.items():
        where = f"{path}.{key}"
        if key in _SCHEMA_MAPS:
            children.extend((sub, f"{where}.{name}", depth + 2, True) for name, sub in value.items())
        elif key in _SCHEMA_LISTS or (key == "items" and isinstance(value, list)):
            children.extend((sub, f"{where}[{index}]", depth + 2, True) for index, sub in enumerate(value))
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            children.append((value, where, depth + 1, True))
        else:
            children.append((value, where, depth + 1, False))
    return children


def _check_schema_object(node: Mapping[Any, Any], path: str) -> int:
    """Checks one schema object (not its subschemas); returns how many members it adds."""
    members = 0
    for key in _NOT_ENFORCED:
        if key in node:
            raise refuse(f"{path}.{key}", "is not supported: the grammar that constrains the output cannot enforce it")
    for key in _COUNTS:
        if key in node:
            value = node[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
                raise refuse(f"{path}.{key}", f"must be a whole number from 0 to {MAX_REPEAT}, not {value!r:.40}")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#/")):
        raise refuse(f"{path}.$ref", f"only local references (#/...) are supported, not {ref!r:.80}")
    for key in _SCHEMA_MAPS:
        if key in node:
            value = node[key]
            if not isinstance(value, Mapping):
                raise refuse(f"{path}.{key}", f"must be an object of schemas, not {_kind(value)}")
            members += len(value)
    for key in _SCHEMA_LISTS:
        if key in node:
            members += _count_schemas(node[key], f"{path}.{key}")
    if "items" in node:
        items = node["items"]
        if isinstance(items, list):
            members += _count_schemas(items, f"{path}.items")
        elif not isinstance(items, Mapping):
            raise refuse(f"{path}.items", f"must be a schema (a JSON object), not {_kind(items)}")
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, (bool, Mapping)):
        raise refuse(f"{path}.additionalProperties", f"must be true, false or a schema, not {_kind(extra)}")
    if "enum" in node:
        enum = node["enum"]
        if not isinstance(enum, list) or not enum:
            raise refuse(f"{path}.enum", "must be a non-empty array")
        members += len(enum)
    members += _check_required(node, path)
    kind = node.get("type")
    if kind is not None and not (isinstance(kind, str) or _strings(kind)):
        raise refuse(f"{path}.type", f"must be a type name or an array of them, not {_kind(kind)}")
    if isinstance(kind, list):
        members += len(kind)
    if "pattern" in node:
        _check_pattern(node["pattern"], f"{path}.pattern")
    return members


def _check_required(node: Mapping[Any, Any], path: str) -> int:
    if "required" not in node:
        return 0
    required = node["required"]
    if not _strings(required):
        raise refuse(f"{path}.required", "must be an array of property names")
    properties = node.get("properties")
    defined = properties if isinstance(properties, Mapping) else {}
    missing = [name for name in required if name not in defined]
    if missing:
        raise refuse(f"{path}.required", f"names {missing[0]!r:.80}, which properties does not define")
    return len(required)


def _check_pattern(pattern: object, path: str) -> None:
    if not isinstance(pattern, str):
        raise refuse(path, f"must be a string, not {_kind(pattern)}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise refuse(path, f"has {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are allowed")
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise refuse(path, 'must start with "^" and end with "$" (the grammar matches the whole string)')
    try:
        re.compile(pattern[1:-1])
    except (re.error, RecursionError, OverflowError) as exc:
        raise refuse(path, f"is not a valid regular expression ({exc})") from exc
    if "(?" in pattern:
        raise refuse(path, "uses (?...) groups (lookarounds, named or non-capturing groups), which are not supported")
    for low, high in _QUANTIFIER.findall(pattern):
        for number in (low, high):
            if number and int(number) > MAX_REPEAT:
                raise refuse(path, f"repeats {number} times; at most {MAX_REPEAT} are allowed")


def _count_schemas(value: object, path: str) -> int:
    if not isinstance(value, list) or not value:
        raise refuse(path, "must be a non-empty array of schemas")
    for index, sub in enumerate(value):
        if not isinstance(sub, Mapping):
            raise refuse(f"{path}[{index}]", f"must be a schema (a JSON object), not {_kind(sub)}")
    return len(value)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Sequence):
        return "an array"
    return type(value).__name__


def check_grammar_size(grammar: str) -> None:
    size = len(grammar.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise refuse(WHERE, f"makes a grammar of {size} bytes; at most {MAX_GRAMMAR_BYTES} are allowed (simplify it)")
