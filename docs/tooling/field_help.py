"""A griffe extension for the API pages: a config field declared as
``name: type = field(default=..., metadata={"help": "..."})`` (the Trainer's way of
documenting arguments) gets its help text as its docstring and its default as its value, so
the API reference lists every config field with its type, default and meaning."""

import ast

from griffe import Docstring, Extension


def default_text(value: ast.expr) -> str | None:
    """The default of a ``field(...)`` call as source: ``default=`` as written, or the
    factory's call for ``default_factory=``."""
    for keyword in value.keywords:
        if keyword.arg == "default":
            return ast.unparse(keyword.value)
        if keyword.arg == "default_factory":
            factory = keyword.value
            if isinstance(factory, ast.Lambda):
                return ast.unparse(factory.body)
            return f"{ast.unparse(factory)}()"
    return None


def help_text(value: ast.expr | None) -> str | None:
    """The constant ``metadata={"help": ...}`` string of a ``field(...)`` call, if any."""
    if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field"):
        return None
    for keyword in value.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, text in zip(keyword.value.keys, keyword.value.values):
                if (isinstance(key, ast.Constant) and key.value == "help"
                        and isinstance(text, ast.Constant) and isinstance(text.value, str)):
                    return text.value
    return None


class FieldHelp(Extension):
    def on_attribute_instance(self, *, node, attr, **kwargs):
        if attr.docstring is None and isinstance(node, ast.AnnAssign):
            text = help_text(node.value)
            if text:
                attr.docstring = Docstring(text, parent=attr)
                attr.value = default_text(node.value)  # the default, not the field() call
