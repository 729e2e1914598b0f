"""Cog 0.23.1's static reading of predict.py, emulated: the schema `cog build` would write.

`cog build` (0.23) does not import predict.py: it parses it with tree-sitter and resolves each
``Input()`` argument by fixed rules (Go, replicate/cog ``pkg/schema/python``: ``inputs.go``,
``literals.go``, ``module_scope.go``, ``annotations.go``, ``target.go``; ``pkg/schema``:
``types.go``, ``openapi_spec.go``; read from the cog 0.23.1 sdist, which carries the Go source).
This module follows those rules for the constructs a predictor like ours uses, function by
function (the Go names are given), and raises :class:`NotEmulated` for any construct it does not
follow (class-attribute ``Input`` references, pydantic models, imported parents), so a file it
cannot read the way cog does fails the test instead of passing on a guess.

What the rules mean for predict.py (each one a silent difference or a build error):

* ``choices=`` must be a list literal, a module-level name bound to a list literal,
  ``list(NAME.keys())``/``list(NAME.values())`` of a module-level dict literal, or ``+`` of
  those; anything else stops the build ("choices expression cannot be statically resolved");
* ``ge``/``le``/``min_length``/``max_length`` must be number literals (Go ``ParseFloat`` of
  the source text); anything else is dropped without a word;
* ``default=`` a literal or a module-level name bound to one; anything else becomes None;
* ``description=`` a string literal or a module-level name bound to one; an f-string is
  dropped. Strings are not unescaped, and an implicitly concatenated string keeps its inner
  quotes (the text between the first and last quote character);
* ``x: int = Input(default=None)`` (not Optional) is *required* with no default.

The tree-sitter grammar is tree-sitter-python from PyPI (pinned in requirements-dev.txt), the
grammar cog vendors through go-tree-sitter; the node types used here are the same in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import tree_sitter_python
from tree_sitter import Language, Node, Parser

_PY = Language(tree_sitter_python.language())


class CogSchemaError(ValueError):
    """What `cog build` would stop with (the message follows cog's)."""


class NotEmulated(NotImplementedError):
    """A construct cog handles that this emulation does not follow; rewrite it or extend this."""


_NONE = ("none", None)  # DefaultValue{Kind: DefaultNone}


def _text(node: Node, src: bytes) -> str:
    return src[node.start_byte : node.end_byte].decode()


# --- literals.go ---------------------------------------------------------------------------------
_GO_DEC_FLOAT = re.compile(r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d[\d_]*)?")


def _go_underscore_ok(s: str) -> bool:
    """strconv.underscoreOK: an underscore only between digits."""
    s = s.lstrip("+-")
    saw = "^"
    for c in s:
        if c.isdigit():
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
    return saw != "_"


def go_parse_float(text: str) -> float | None:
    """strconv.ParseFloat(text, 64) for decimal text (hex floats, inf and nan are not used here)."""
    t = text.strip()
    if t.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(t)
    if not _GO_DEC_FLOAT.fullmatch(t) or ("_" in t and not _go_underscore_ok(t)):
        return None
    return float(t.replace("_", ""))


def go_parse_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64): base prefixes, underscores, a leading 0 meaning octal."""
    t = text.strip()
    octal = re.fullmatch(r"([+-]?)0(\d[\d_]*)", t)
    try:
        value = int(octal.group(1) + octal.group(2), 8) if octal else int(t, 0)
    except ValueError:
        return None
    return value if -(2**63) <= value < 2**63 else None


def parse_string_literal(node: Node, src: bytes) -> str | None:
    """parseStringLiteral: the text between the quotes, as written (no unescaping, no prefixes)."""
    text = _text(node, src)
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else None
    if text.startswith(('"', "'")):
        return text[1:-1] if len(text) >= 2 else None
    if text.startswith(('r"', "r'")):
        return text[2:-1] if len(text) >= 3 else None
    return None


def parse_default_value(node: Node, src: bytes) -> tuple[str, object] | None:
    """parseDefaultValue: ``(kind, value)`` or None when not a literal."""
    t = node.type
    if t == "none":
        return _NONE
    if t in ("true", "false"):
        return ("bool", t == "true")
    if t == "integer":
        n = go_parse_int(_text(node, src))
        return None if n is None else ("int", n)
    if t == "float":
        f = go_parse_float(_text(node, src))
        return None if f is None else ("float", f)
    if t in ("string", "concatenated_string"):
        s = parse_string_literal(node, src)
        return None if s is None else ("str", s)
    if t in ("list", "set"):
        items = parse_list_literal(node, src, kind=t)
        return None if items is None else (t, items)
    if t == "dictionary":
        keys, values = [], []
        for pair in node.named_children:
            if pair.type != "pair":
                continue
            k = parse_default_value(pair.child_by_field_name("key"), src)
            v = parse_default_value(pair.child_by_field_name("value"), src)
            if k is not None and v is not None:
                keys.append(k)
                values.append(v)
        return ("dict", (keys, values))
    if t == "unary_operator":
        text = _text(node, src).strip()
        n = go_parse_int(text)
        if n is not None:
            return ("int", n)
        f = go_parse_float(text)
        return None if f is None else ("float", f)
    if t == "tuple":
        items = [v for c in node.named_children if (v := parse_default_value(c, src)) is not None]
        return ("list", items)
    return None


def parse_list_literal(node: Node, src: bytes, kind: str = "list") -> list | None:
    if node.type != kind:
        return None
    items = []
    for child in node.named_children:
        value = parse_default_value(child, src)
        if value is None:
            return None
        items.append(value)
    return items


def parse_bool_literal(node: Node, src: bytes) -> bool | None:
    text = _text(node, src)
    return {"true": True, "false": False}.get(node.type, {"True": True, "False": False}.get(text))


def to_json(value: tuple[str, object]) -> object:
    """DefaultValue.ToJSON."""
    kind, v = value
    if kind in ("list", "set"):
        return [to_json(x) for x in v]
    if kind == "dict":
        keys, values = v
        return {
            (k[1] if k[0] == "str" else str(to_json(k))): to_json(x)
            for k, x in zip(keys, values, strict=True)
        }
    return v


# --- module_scope.go -----------------------------------------------------------------------------
def collect_module_scope(root: Node, src: bytes) -> dict[str, tuple[str, object]]:
    scope = {}
    for child in root.named_children:
        assign = None
        if child.type == "expression_statement" and child.named_child_count == 1:
            if child.named_children[0].type == "assignment":
                assign = child.named_children[0]
        elif child.type == "assignment":
            assign = child
        if assign is None:
            continue
        left, right = assign.child_by_field_name("left"), assign.child_by_field_name("right")
        if left is None or left.type != "identifier" or right is None:
            continue
        value = parse_default_value(right, src)
        if value is not None:
            scope[_text(left, src)] = value
    return scope


def resolve_string_expr(node: Node, src: bytes, scope: dict) -> str | None:
    s = parse_string_literal(node, src)
    if s is not None:
        return s
    if node.type == "identifier":
        value = scope.get(_text(node, src))
        if value is not None and value[0] == "str":
            return value[1]
    return None


def resolve_default_expr(node: Node, src: bytes, scope: dict) -> tuple[str, object] | None:
    value = parse_default_value(node, src)
    if value is not None:
        return value
    if node.type == "identifier":
        return scope.get(_text(node, src))
    return None


def resolve_choices_expr(node: Node, src: bytes, scope: dict) -> list | None:
    t = node.type
    if t == "list":
        return parse_list_literal(node, src)
    if t == "identifier":
        value = scope.get(_text(node, src))
        return value[1] if value is not None and value[0] == "list" else None
    if t == "call":
        fn, args = node.child_by_field_name("function"), node.child_by_field_name("arguments")
        if fn is None or _text(fn, src) != "list" or args is None or not args.named_children:
            return None
        arg = args.named_children[0]
        inner = arg.child_by_field_name("function") if arg.type == "call" else None
        if inner is None or inner.type != "attribute":
            return None
        obj, attr = inner.child_by_field_name("object"), inner.child_by_field_name("attribute")
        if obj is None or attr is None or obj.type != "identifier":
            return None
        value = scope.get(_text(obj, src))
        if value is None or value[0] != "dict":
            return None
        return {"keys": value[1][0], "values": value[1][1]}.get(_text(attr, src))
    if t == "binary_operator":
        if not any(not c.is_named and _text(c, src) == "+" for c in node.children):
            return None
        left = resolve_choices_expr(node.child_by_field_name("left"), src, scope)
        right = resolve_choices_expr(node.child_by_field_name("right"), src, scope)
        return None if left is None or right is None else left + right
    return None


# --- imports.go ----------------------------------------------------------------------------------
def collect_imports(root: Node, src: bytes) -> dict[str, tuple[str, str]]:
    """``local name -> (module, original)``; builtins always present."""
    names: dict[str, tuple[str, str]] = {}

    def add(module: str, node: Node) -> None:
        if node.type == "dotted_name":
            names[_text(node, src)] = (module, _text(node, src))
        elif node.type == "aliased_import":
            orig = _text(node.child_by_field_name("name"), src)
            alias = node.child_by_field_name("alias")
            names[_text(alias, src) if alias else orig] = (module, orig)

    for child in root.named_children:
        if child.type == "import_from_statement":
            mod = child.child_by_field_name("module_name")
            if mod is None:
                raise NotEmulated(f"relative import: {_text(child, src)}")
            module = _text(mod, src)
            for c in child.children:
                if (c.type == "dotted_name" and c.start_byte != mod.start_byte) or c.type == "aliased_import":
                    add(module, c)
                elif c.type == "import_list":
                    for ic in c.children:
                        add(module, ic)
        elif child.type == "import_statement":
            text = _text(child, src).strip().removeprefix("import ").strip()
            for part in (p.strip() for p in text.split(",")):
                if part:
                    module, _, alias = part.partition(" as ")
                    names[(alias or module).strip()] = (module.strip(), module.strip())
    for builtin in ("str", "int", "float", "bool", "list", "dict", "set", "None"):
        names.setdefault(builtin, ("builtins", builtin))
    return names


# --- annotations.go, types.go (ResolveInputType for the types an input can have here) ------------
_PRIMITIVES = {
    "bool": {"type": "boolean"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
    "Any": {"type": "object"},
}


@dataclass
class InputType:
    primitive: str  # a key of _PRIMITIVES
    array: bool = False
    nullable: bool = False


def parse_type_annotation(node: Node, src: bytes) -> tuple:
    """parseTypeAnnotation: ("simple", name) | ("generic", name, args) | ("union", members)."""
    n = node.named_children[0] if node.type == "type" and node.named_child_count else node
    if n.type in ("identifier", "attribute"):
        return ("simple", _text(n, src))
    if n.type == "none":
        return ("simple", "None")
    if n.type == "subscript":
        value = n.child_by_field_name("value")
        args = [parse_type_annotation(c, src) for c in n.named_children if c.start_byte != value.start_byte]
        return ("generic", _text(value, src), args) if args else ("simple", _text(value, src))
    if n.type == "binary_operator":
        if not any(not c.is_named and _text(c, src) == "|" for c in n.children):
            raise CogSchemaError("non-union binary operator in type annotation")
        members = []
        for side in (n.child_by_field_name("left"), n.child_by_field_name("right")):
            ann = parse_type_annotation(side, src)
            members += ann[1] if ann[0] == "union" else [ann]
        return ("union", members)
    # Every other node (a grammar's generic_type or union_type, a string annotation) is read
    # from its text (parseTypeFromString), so both grammar generations give the same result.
    text = _text(n, src)
    if n.type in ("string", "concatenated_string"):
        text = text.strip("\"'")
    ann = parse_type_from_string(text)
    if ann is None:
        raise CogSchemaError(f"unsupported type annotation {n.type}: {text}")
    return ann


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return [*parts, s[start:]]


def parse_type_from_string(s: str) -> tuple | None:
    """parseTypeFromString."""
    s = s.strip()
    if not s:
        return None
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return parse_type_from_string(s[1:-1])
    pipes = _split_top(s, "|")
    if len(pipes) > 1:
        members = [parse_type_from_string(p) for p in pipes]
        return None if None in members else ("union", members)
    if "[" in s and s.endswith("]"):
        outer, inner = s[: s.index("[")].strip(), s[s.index("[") + 1 : -1]
        args = [parse_type_from_string(p) for p in _split_top(inner, ",")]
        return None if not args or None in args else ("generic", outer, args)
    if all(part and re.fullmatch(r"\w+", part, re.ASCII) for part in s.split(".")):
        return ("simple", s)
    return None


def resolve_input_type(ann: tuple, imports: dict) -> InputType:
    """resolveInputType for primitives, Optional[X], X | None, Union[X, None] and list[X]."""
    if ann[0] == "simple":
        name = ann[1].split(".", 1)[1] if "." in ann[1] else ann[1]
        if name in ("dict", "Dict"):
            return InputType("Any")
        if name not in _PRIMITIVES:
            raise CogSchemaError(f"unsupported type: {ann[1]}")
        return InputType(name)
    if ann[0] == "generic":
        outer = ann[1].split(".", 1)[1] if "." in ann[1] else ann[1]
        if outer == "Optional":
            inner = resolve_input_type(ann[2][0], imports)
            inner.nullable = True
            return inner
        if outer == "Union":
            return resolve_input_type(("union", ann[2]), imports)
        if outer in ("List", "list"):
            inner = resolve_input_type(ann[2][0], imports)
            if inner.nullable or inner.array:
                raise CogSchemaError("nested generics like List[Optional[X]] are not supported")
            return InputType(inner.primitive, array=True)
        raise NotEmulated(f"{outer}[...]")
    variants = [m for m in ann[1] if m != ("simple", "None")]
    if len(variants) != 1:
        raise NotEmulated("unions of several types")
    inner = resolve_input_type(variants[0], imports)
    inner.nullable = inner.nullable or len(variants) < len(ann[1])
    return inner


def input_type_json(t: InputType) -> dict:
    """inputTypeJSONSchema."""
    schema = (
        {"type": "array", "items": dict(_PRIMITIVES[t.primitive])}
        if t.array
        else dict(_PRIMITIVES[t.primitive])
    )
    if t.nullable:
        schema["nullable"] = True
    return schema


# --- inputs.go -----------------------------------------------------------------------------------
@dataclass
class InputField:
    name: str
    order: int
    type: InputType
    default: tuple[str, object] | None = None
    info: dict = field(
        default_factory=dict
    )  # description, ge, le, min_length, max_length, regex, choices, ...


def _is_input_call(node: Node, src: bytes, imports: dict) -> bool:
    if node.type != "call":
        return False
    name = _text(node.child_by_field_name("function"), src)
    return name == "Input" or imports.get(name) == ("cog", "Input")


def parse_input_call(node: Node, src: bytes, param: str, scope: dict) -> tuple[tuple | None, dict]:
    """parseInputCall: ``(default, info)``; an unresolvable ``choices`` is a build error."""
    default, info = None, {}
    args = node.child_by_field_name("arguments")
    for child in args.named_children if args is not None else ():
        if child.type != "keyword_argument":
            continue
        key, val = _text(child.child_by_field_name("name"), src), child.child_by_field_name("value")
        if key == "default":
            default = resolve_default_expr(val, src, scope) or _NONE
        elif key == "default_factory":
            raise CogSchemaError(
                f"parameter '{param}': default_factory is not supported in static schema generation"
            )
        elif key == "description":
            if (s := resolve_string_expr(val, src, scope)) is not None:
                info["description"] = s
        elif key in ("ge", "le", "min_length", "max_length"):
            if (f := go_parse_float(_text(val, src))) is not None:
                info[key] = int(f) if key.endswith("length") else f
        elif key in ("regex", "accept"):
            if (s := parse_string_literal(val, src)) is not None:
                info[key] = s
        elif key == "choices":
            items = parse_list_literal(val, src)
            if items is None:
                items = resolve_choices_expr(val, src, scope)
            if items is None:
                raise CogSchemaError(f"parameter '{param}': choices expression cannot be statically resolved")
            info["choices"] = items
        elif key == "deprecated" and (b := parse_bool_literal(val, src)) is not None:
            info["deprecated"] = b
    return default, info


def extract_inputs(params: Node, src: bytes, imports: dict, scope: dict, method: str) -> list[InputField]:
    fields, order, seen_self = [], 0, False
    for child in params.children:
        if child.type == "identifier" and not seen_self and _text(child, src) == "self":
            seen_self = True
        elif child.type == "typed_parameter":
            name = next(_text(c, src) for c in child.named_children if c.type == "identifier")
            type_node = next(c for c in child.named_children if c.type == "type")
            fields.append(
                InputField(name, order, resolve_input_type(parse_type_annotation(type_node, src), imports))
            )
            order += 1
        elif child.type == "typed_default_parameter":
            name = _text(child.child_by_field_name("name"), src)
            itype = resolve_input_type(parse_type_annotation(child.child_by_field_name("type"), src), imports)
            value = child.child_by_field_name("value")
            if _is_input_call(value, src, imports):
                default, info = parse_input_call(value, src, name, scope)
            elif value.type in ("attribute", "call"):
                raise NotEmulated(f"parameter '{name}': a class-attribute or method Input reference")
            else:
                default, info = resolve_default_expr(value, src, scope), {}
                if default is None:
                    raise CogSchemaError(
                        f"parameter '{name}': default `{_text(value, src)}` cannot be statically resolved"
                    )
            if info.get("accept") is not None and itype.primitive not in ("Path", "File"):
                raise CogSchemaError(f"accept is only valid on Path or File inputs (parameter '{name}')")
            fields.append(InputField(name, order, itype, default, info))
            order += 1
        elif child.type == "default_parameter":
            name = _text(child.child_by_field_name("name"), src)
            raise CogSchemaError(f"parameter '{name}' on {method} has no type annotation")
    return fields


# --- target.go -----------------------------------------------------------------------------------
def _unwrap(node: Node, kind: str) -> Node | None:
    if node.type == kind:
        return node
    if node.type == "decorated_definition":
        return next((c for c in node.named_children if c.type == kind), None)
    return None


def find_predict(root: Node, src: bytes, class_name: str) -> Node:
    """findPredictMethodInClass: run() first, else the legacy predict() (cog 0.23 warns)."""
    for child in root.named_children:
        cls = _unwrap(child, "class_definition")
        if cls is None or _text(cls.child_by_field_name("name"), src) != class_name:
            continue
        methods = {}
        for stmt in cls.child_by_field_name("body").named_children:
            fn = _unwrap(stmt, "function_definition")
            if fn is not None:
                methods[_text(fn.child_by_field_name("name"), src)] = fn
        if "run" in methods or "predict" in methods:
            return methods.get("run") or methods["predict"]
        raise NotEmulated(f"{class_name}: run()/predict() inherited from a parent class")
    raise CogSchemaError(f"predictor not found: {class_name}")


# --- openapi_spec.go: buildInputSchema and the output -------------------------------------------
def _title(name: str) -> str:
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


def build_schema(fields: list[InputField], output: dict) -> dict:
    """The ``components.schemas`` cog writes: Input, Output and one enum schema per choices field."""
    properties, required, enums = {}, [], {}
    for f in fields:
        prop: dict = {"x-order": f.order}
        info = f.info
        if info.get("choices"):
            enums[f.name] = {
                "title": f.name,
                "description": "An enumeration.",
                "enum": [to_json(c) for c in info["choices"]],
                "type": _PRIMITIVES[f.type.primitive].get("type", "string"),
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{f.name}"}]
        else:
            prop["title"] = _title(f.name)
            prop.update(input_type_json(f.type))
        nullable = f.type.nullable or (f.type.primitive == "Secret" and f.default == _NONE)
        has_default = f.default is not None and not (f.default == _NONE and not nullable)
        if not has_default:
            required.append(f.name)
        else:
            prop["default"] = to_json(f.default)
        if nullable:
            prop["nullable"] = True
        for key, out in (
            ("description", "description"),
            ("ge", "minimum"),
            ("le", "maximum"),
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
            ("regex", "pattern"),
            ("accept", "x-cog-accept"),
        ):
            if key in info:
                prop[out] = info[key]
        if info.get("deprecated"):
            prop["deprecated"] = True
        properties[f.name] = prop
    inputs = {"title": "Input", "type": "object", "properties": properties}
    if required:
        inputs["required"] = required
    return {"Input": inputs, "Output": output, **enums}


def output_schema(func: Node, src: bytes) -> dict:
    """ResolveSchemaType + JSONSchema for a primitive or list-of-primitive return type."""
    ret = func.child_by_field_name("return_type")
    if ret is None:
        raise CogSchemaError("predict: missing return type")
    ann = parse_type_annotation(ret, src)
    if ann[0] == "generic" and ann[1] in ("list", "List") and ann[2][0][0] == "simple":
        schema = {"type": "array", "items": dict(_PRIMITIVES[ann[2][0][1]])}
    elif ann[0] == "simple" and ann[1] in _PRIMITIVES:
        schema = dict(_PRIMITIVES[ann[1]])
    else:
        raise NotEmulated(f"return type {_text(ret, src)}")
    return {**schema, "title": "Output"}


def static_schema(path: str | Path, class_name: str = "Predictor") -> dict:
    """The ``components.schemas`` part of the OpenAPI schema cog 0.23.1 would build for ``path``."""
    src = Path(path).read_bytes()
    root = Parser(_PY).parse(src).root_node
    imports = collect_imports(root, src)
    scope = collect_module_scope(root, src)
    func = find_predict(root, src, class_name)
    method = _text(func.child_by_field_name("name"), src)
    fields = extract_inputs(func.child_by_field_name("parameters"), src, imports, scope, method)
    return build_schema(fields, output_schema(func, src))
