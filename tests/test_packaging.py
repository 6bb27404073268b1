"""Every package neoj imports at run time is one its install declares, so a fresh install works.

A missing dependency passed CI once because CI ran in a Python where it had been installed by hand;
this test reads the installed distribution's own requirements, so it fails whatever else is there.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import neoj

SOURCE = Path(neoj.__file__).resolve().parent
# Imported only for a task's optional extra or never at run time; checked separately below.
TEST_ONLY = {"transformers", "peft", "openai", "httpx", "ctranslate2", "pytest"}
# Installed by PyTorch's CUDA builds (their own requirement) and needed only on a GPU: imported inside
# the function that first runs a GPU kernel, never at import time. Declaring it would put 190 MB of
# compiler on every CPU-only install.
WITH_TORCH_CUDA = {"triton": "gpu_kernels.py"}


def _imported_top_level_modules() -> dict[str, set[str]]:
    """Maps each absolute top-level module imported anywhere in neoj to the files importing it."""
    found: dict[str, set[str]] = {}
    for file in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(file.relative_to(SOURCE)))
    return found


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_runtime_requirements() -> set[str]:
    declared = set()
    for requirement in metadata.requires("neoj") or []:
        if "extra ==" in requirement:
            continue
        declared.add(_normalized(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]))
    return declared


def test_every_third_party_import_is_a_declared_dependency():
    distributions = metadata.packages_distributions()
    declared = _declared_runtime_requirements()
    undeclared = {}
    for module, files in _imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module == "neoj" or module in TEST_ONLY or module in WITH_TORCH_CUDA:
            continue
        owners = {_normalized(d) for d in distributions.get(module, [module])}
        if not owners & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not in [project].dependencies: {undeclared}"


def test_numpy_is_declared_because_checkpoint_reading_uses_tensor_numpy():
    uses_numpy = [f.name for f in SOURCE.rglob("*.py") if ".numpy()" in f.read_text(encoding="utf-8")]
    if uses_numpy:
        assert "numpy" in _declared_runtime_requirements(), uses_numpy


def test_test_only_packages_are_never_imported_at_run_time():
    leaked = {m: sorted(f) for m, f in _imported_top_level_modules().items() if m in TEST_ONLY}
    assert not leaked, f"test/bench-only packages imported by neoj: {leaked}"


def test_gpu_only_packages_are_imported_lazily_in_one_module():
    found = _imported_top_level_modules()
    for module, only_file in WITH_TORCH_CUDA.items():
        assert found.get(module, set()) <= {only_file}, found[module]
        tree = ast.parse((SOURCE / only_file).read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any(module in ast.dump(n) for n in top_level), f"{only_file} imports {module} at import time"
