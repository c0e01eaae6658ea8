"""The module layers: common.py (science) imports nothing of ours, demo.py and training.py build on it, the method
scripts on top; no import circle, also not through an import inside a function."""
import ast

import pytest

from conftest import ROOT

SCRIPTS = {"asss", "camix", "classmix_ssl", "dacs", "dldm", "iidm"}
ALLOWED = {"common": set(), "demo": {"common"}, "training": {"common", "demo"}}


def our_imports(module):
    """Every module of this project that `module` imports anywhere in its file."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names & (SCRIPTS | set(ALLOWED))


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below(module):
    assert our_imports(module) <= ALLOWED[module], our_imports(module) - ALLOWED[module]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_import_no_other_script(script):
    assert not our_imports(script) & (SCRIPTS - {script})
