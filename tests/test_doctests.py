"""Every docstring example in the installed jpeft package runs, as a doctest.

Modules are imported by their installed names (``jpeft.models.llama``, not the folder
path ``models/llama.py``), so each runs once, against the one copy of every registry.
Examples run from the repository root with the bundled ``assets/`` paths resolving.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil

import pytest

import jpeft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> list[str]:
    names = ["jpeft"]
    for info in pkgutil.walk_packages(jpeft.__path__, "jpeft."):
        names.append(info.name)
    for sub in ("jpeft.models", "jpeft.train", "jpeft.assets"):
        package = importlib.import_module(sub)
        names.append(sub)
        names += [i.name for i in pkgutil.walk_packages(package.__path__, f"{sub}.")]
    return sorted(set(names))


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for test in finder.find(module, name, globs=dict(vars(module))):
        result = runner.run(test, out=failures.append)
        del result
    assert not failures, "".join(failures)


def test_the_package_has_docstring_examples():
    """The doctests above are not vacuous: most public modules carry examples."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    count = sum(
        len(t.examples)
        for name in MODULES
        for t in finder.find(importlib.import_module(name), name)
    )
    assert count > 300, count
