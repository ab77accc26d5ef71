"""Every module of the package imports with only the core dependencies installed."""
import importlib
import pkgutil

import pytest

import dpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(dpo.__path__, prefix="dpo."))


def test_package_has_the_core_modules():
    assert {"dpo.loss", "dpo.model.logprobs", "dpo.model.forward"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
