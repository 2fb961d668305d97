"""The built-in corpus: English text that ships with every Python, so training works offline.

Two parts, both public documentation of the Python language and library (PSF licence):
- the language reference topics that `help()` shows (`pydoc_data.topics`, about 0.5 MB), one
  document per topic, titled with its name;
- the docstrings of the standard library's modules, classes and functions, read with `ast`
  (nothing is imported or run), one document per module (about 1.5 MB).

The order is fixed (sorted by name), so the same Python version always gives the same corpus;
the corpus fingerprint includes the Python version. Tests, generated code and GUI toolkits are left
out because their docstrings are repetitive or not prose.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIPPED_PACKAGES = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data"}
MIN_DOCSTRING_CHARS = 80


@functools.cache
def builtin_documents() -> tuple[str, ...]:
    """All documents, assembled once per process (parsing the library takes a few seconds)."""
    return (*topic_documents(), *docstring_documents())


def topic_documents() -> Iterator[str]:
    for name, text in topics():
        yield f"{name}\n\n{text}\n"


def docstring_documents() -> Iterator[str]:
    for sections in module_docstrings():
        yield "\n\n".join(f"{title}\n\n{text}" for title, text in sections) + "\n"


def topics() -> list[tuple[str, str]]:
    """(topic name, text) of the language reference topics, sorted by name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the docs out of the standard library
        return []
    return [(name, topics[name].strip()) for name in sorted(topics)]


@functools.cache
def module_docstrings() -> tuple[list[tuple[str, str]], ...]:
    """Per standard-library module: [(title, docstring)], titles "Module x" or "x.Class.method"."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if relative.parts[0] in SKIPPED_PACKAGES or "tests" in relative.parts:
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        if sections := _module_sections(path, module):
            modules.append(sections)
    return tuple(modules)


def _module_sections(path: Path, module: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    sections = []
    if (docstring := ast.get_docstring(tree)) and len(docstring) >= MIN_DOCSTRING_CHARS:
        sections.append((f"Module {module}", docstring))
    for node, qualified in _definitions(tree, module):
        docstring = ast.get_docstring(node)
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            sections.append((qualified, docstring))
    return sections


def _definitions(tree: ast.AST, prefix: str):
    """Public classes and functions, with dotted names, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            qualified = f"{prefix}.{node.name}"
            yield node, qualified
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node, qualified)
