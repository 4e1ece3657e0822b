"""Run the docstring examples of every installed ``ebrflow.*`` module.

pytest's ``--doctest-modules`` would import ``model/x.py`` as the top-level module ``model.x``, a second copy of
``ebrflow.model.x``; importing them by their installed names keeps one copy of each module.
"""

import doctest
import importlib
import pkgutil

import pytest

import ebrflow

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(ebrflow.__path__, "ebrflow.") if not info.name.endswith("__main__")
)
for sub in ("stream", "model", "indexer", "ops", "model.tasks"):
    package = importlib.import_module(f"ebrflow.{sub}")
    MODULES += sorted(info.name for info in pkgutil.iter_modules(package.__path__, f"ebrflow.{sub}."))


def test_every_subpackage_is_walked() -> None:
    assert {"ebrflow.model.ssmtl", "ebrflow.stream.pipeline", "ebrflow.indexer.query", "ebrflow.ops.metrics"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", sorted(set(MODULES)))
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
