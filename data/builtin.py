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
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the docs out of the standard library
        return
    for name in sorted(topics):
        yield f"{name}\n\n{topics[name].strip()}\n"


def docstring_documents() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if relative.parts[0] in SKIPPED_PACKAGES or "tests" in relative.parts:
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        if document := _module_document(path, module):
            yield document


def _module_document(path: Path, module: str) -> str | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None
    sections = []
    if (docstring := ast.get_docstring(tree)) and len(docstring) >= MIN_DOCSTRING_CHARS:
        sections.append(f"Module {module}\n\n{docstring}")
    for node, qualified in _definitions(tree, module):
        docstring = ast.get_docstring(node)
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            sections.append(f"{qualified}\n\n{docstring}")
    return "\n\n".join(sections) + "\n" if sections else None


def _definitions(tree: ast.AST, prefix: str):
    """Public classes and functions, with dotted names, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            qualified = f"{prefix}.{node.name}"
            yield node, qualified
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node, qualified)
