"""MkDocs hook: builds the configuration reference from fedsim's config classes at build time.

Every page whose text holds the marker ``<!-- fedsim:config-reference -->`` gets, in its place, one
table per config section (``data:``, ``model:``, ``engine:``, ``sweep:``) and one per
``algorithm:`` name: each key with its type (allowed values for a choice), default and
description, and the class's own docstring. A key's description is its ``Field(description=...)``
or, failing that, the docstring written under the attribute; a subclass that redeclares a key
only to change its default inherits the nearest base class's description. The page cannot go
stale: it is read from the classes that validate the files.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import json
import re
import textwrap
import typing

MARKER = "<!-- fedsim:config-reference -->"


def _type(annotation) -> str:
    """A short, readable type: ``"a" | "b"`` for a Literal, ``int | None`` for an Optional."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v!r}`".replace("'", '"') for v in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return text if origin is None else str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "null"
    try:
        return f"`{json.dumps(value)}`"  # as YAML writes it: false, "digits", {}
    except TypeError:
        return f"`{value!r}`"


def _markdown(text: str, one_line: bool = True) -> str:
    """Docstring text as Markdown: reST roles and double backticks become code spans; for a table
    cell (``one_line``) line breaks become spaces, elsewhere paragraphs and bullet lists stay."""
    text = re.sub(r":(?:mod|func|class|data|meth|attr):`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"(?<![\w/`])docs/([\w-]+)\.md", r"[docs/\1.md](\1.md)", text)  # pages of this site
    if one_line:
        return re.sub(r"\s*\n\s*", " ", text).strip()
    return re.sub(r"([^\n])\n(\* )", r"\1\n\n\2", text).strip()  # a list needs a blank line before it


@functools.cache
def _attribute_docs(cls) -> dict[str, str]:
    """The docstrings written under annotated attributes in ``cls``'s own body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, after in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _description(cls, name: str) -> str:
    """A key's description: from the nearest class in ``cls``'s MRO that describes it."""
    for klass in cls.__mro__:
        fields = getattr(klass, "model_fields", {})
        if name not in fields or name not in vars(klass).get("__annotations__", {}):
            continue
        text = fields[name].description or _attribute_docs(klass).get(name, "")
        if text:
            return _markdown(text)
    return ""


def _doc(cls) -> str:
    return _markdown(inspect.getdoc(cls) or "", one_line=False)


def _table(cls, skip: tuple[str, ...] = ()) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        desc = _description(cls, name).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(rows)


def reference() -> str:
    """The reference as Markdown."""
    from fedsim import config

    out = []
    for key, cls in (
        ("data", config.DataConfig),
        ("model", config.ModelConfig),
        ("engine", config.EngineConfig),
        ("sweep", config.SweepConfig),
        ("system", config.SystemConfig),
        ("system.devices", config.DevicesConfig),
        ("system.devices.<quantity>", config.Distribution),
        ("system.devices.tiers[]", config.DeviceTier),
        ("system.availability", config.AvailabilityConfig),
        ("runs[].system", config.RoundRule),
    ):
        out += [f"## `{key}:`", "", _doc(cls), "", _table(cls), ""]
    out += [
        "## Top-level keys",
        "",
        _table(config.ExperimentConfig, skip=("data", "model", "engine", "sweep", "system", "runs")),
        "",
    ]
    out += [
        "## `runs:` entries, per `algorithm:`",
        "",
        "Every run takes the keys of its algorithm's config class; a key that does not apply to the "
        "algorithm is an error. Common keys (`RunConfig`):",
        "",
        _table(config.RunConfig),
        "",
        "### A run's `uplink:` (CodecConfig)",
        "",
        _doc(config.CodecConfig),
        "",
        _table(config.CodecConfig),
        "",
        "### A run's `secure_aggregation:` (SecAggConfig)",
        "",
        _doc(config.SecAggConfig),
        "",
        _table(config.SecAggConfig),
        "",
    ]
    base = set(config.RunConfig.model_fields)
    for name, cls in sorted(config.run_configs().items()):
        own = tuple(
            k
            for k in cls.model_fields
            if k not in base or cls.model_fields[k].default != config.RunConfig.model_fields[k].default
        )
        out += [f"### `algorithm: {name}` ({cls.__name__})", "", _doc(cls), ""]
        if own:
            out += [
                "Keys of its own, or defaults that differ from `RunConfig`'s:",
                "",
                _table(cls, skip=tuple(k for k in cls.model_fields if k not in own)),
                "",
            ]
        else:
            out += ["No keys beyond `RunConfig`'s.", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
