"""The package's layout: imports flow one way. The library (every module of `jaxdec` outside
`jaxdec/hf` and `jaxdec/tools`) imports neither `jaxdec.hf` nor `jaxdec.tools`; `jaxdec.hf` does
not import the tools; the tools may import both."""

from __future__ import annotations

import ast
import pathlib

import pytest

import jaxdec

PACKAGE = pathlib.Path(jaxdec.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported_modules(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> set[str]:
    """Every module an `import` or `from ... import` in the file names, absolute (relative
    imports resolved against the file's package); for `from m import n`, both m and m.n."""
    parts = ["jaxdec", *path.relative_to(package).with_suffix("").parts]
    here = parts[:-1]  # the file's package (an __init__.py's is the package itself)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _area(path: pathlib.Path) -> str:
    top = path.relative_to(PACKAGE).parts[0]
    return top if top in ("hf", "tools") else "library"


FORBIDDEN = {"library": ("jaxdec.hf", "jaxdec.tools"), "hf": ("jaxdec.tools",), "tools": ()}


def _breaks(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for f in forbidden if m == f or m.startswith(f + "."))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_from_the_tools_and_hf_to_the_library_never_back(path):
    assert not _breaks(imported_modules(path), FORBIDDEN[_area(path)])


def test_the_tools_are_apart_from_the_library():
    assert {p.relative_to(PACKAGE).parts[0] for p in MODULES if _area(p) == "tools"} == {"tools"}
    assert (PACKAGE / "tools" / "__init__.py").is_file()
    for gone in ("bench.py", "explain.py", "trainer.py", "report.py", "convert.py"):
        assert not (PACKAGE / gone).exists(), gone  # the tools live under jaxdec/tools only


def test_the_check_sees_every_form_of_import(tmp_path):
    package = tmp_path / "jaxdec"
    (package / "sub").mkdir(parents=True)
    forms = {
        "import jaxdec.tools.run": "jaxdec.tools.run",
        "from jaxdec import tools": "jaxdec.tools",
        "from jaxdec.hf import gguf": "jaxdec.hf",
        "from .. import hf": "jaxdec.hf",
        "from ..tools.timing import measure": "jaxdec.tools.timing",
    }
    for i, (line, module) in enumerate(forms.items()):
        path = package / "sub" / f"m{i}.py"
        path.write_text(line + "\n")
        assert _breaks(imported_modules(path, package), FORBIDDEN["library"]), line
        assert module in imported_modules(path, package), line
    clean = package / "sub" / "clean.py"
    clean.write_text("import jaxdec.decode\nfrom jaxdec import model\nfrom . import sibling\n")
    assert not _breaks(imported_modules(clean, package), FORBIDDEN["library"])
