"""Declare what is imported, import what is declared (pyproject.toml against the source's import statements).

* every third-party module the runtime (`legion_rt/`) imports at module level is a base dependency;
* every third-party module imported anywhere in `legion_rt/` or `export/` is declared (base or an extra);
* every base dependency is imported by the runtime, and every extra's package by some file of the repository
  (source, tests or benchmarks), except the few that are used through another package (listed with the reason).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
LOCAL = {"legion_rt", "export", "tests", "benchmarks", "_C"}
# Import name -> distributions, for modules that may not be installed here (GPU-only).
NOT_INSTALLED_HERE = {
    "tensorrt": {"tensorrt-cu12", "tensorrt-cu13", "tensorrt"},
    "cuda": {"cuda-python", "cuda-bindings"},
    "cupy": {"cupy-cuda12x", "cupy-cuda13x"},
    "onnxruntime": {"onnxruntime", "onnxruntime-gpu"},  # one module, two alternative wheels
}
# Declared but used only through another package (never imported by name).
INDIRECT = {
    "onnxscript": "torch.onnx's dynamo exporter needs it",
    "uvicorn": "runs the ASGI app (imported lazily by the serve command)",
    "python-multipart": "FastAPI's multipart form parsing",
    "httpx": "starlette's TestClient",
    "clang-format": "a command: `make lint` checks the C++/CUDA formatting",
    "ruff": "a command: `make lint`",
    "segment-anything": "tests load its modules by file (importlib.util.find_spec), skipping its package __init__",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])


def _pyproject() -> tuple[set[str], dict[str, set[str]]]:
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    base = {_requirement_name(r) for r in doc["project"]["dependencies"]}
    extras = {
        k: {_requirement_name(r) for r in v} for k, v in doc["project"]["optional-dependencies"].items()
    }
    return base, extras


def _imports(paths) -> tuple[set[str], set[str]]:
    """(module-level third-party imports, all third-party imports) of the files."""
    top, every = set(), set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        module_level = set()
        for node in tree.body:  # statements at module level, including inside a top-level try/if
            for sub in ast.walk(node) if isinstance(node, (ast.Try, ast.If)) else [node]:
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    module_level.add(id(sub))
        if_type_checking = {
            id(s)
            for n in tree.body
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for s in ast.walk(n)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif (  # pytest.importorskip("module")
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root in LOCAL or id(node) in if_type_checking:
                    continue
                every.add(root)
                if id(node) in module_level:
                    top.add(root)
    return top, every


def _distributions(module: str) -> set[str]:
    found = {_norm(d) for d in md.packages_distributions().get(module, [])}
    return found | {_norm(d) for d in NOT_INSTALLED_HERE.get(module, set())}


def _py(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


# Runtime subpackages that are optional features: their imports belong to these extras (they are imported only
# by the command that needs them, which says which extra to install when one is missing).
FEATURES = {"legion_rt/serve": ("serve", "ray")}


def test_runtime_imports_are_declared():
    base, extras = _pyproject()
    declared = base | set().union(*extras.values())
    features = {REPO / f for f in FEATURES}
    core = [p for p in _py("legion_rt") if not any(f in p.parents for f in features)]
    top, every = _imports(core)
    for module in sorted(top):
        assert _distributions(module) & base, (
            f"legion_rt imports {module!r} at module level: not a base dependency"
        )
    for module in sorted(every):
        assert _distributions(module) & declared, (
            f"legion_rt imports {module!r}: declared nowhere in pyproject"
        )
    for folder, names in FEATURES.items():
        _, used = _imports(sorted((REPO / folder).rglob("*.py")))
        allowed = base | set().union(*(extras[n] for n in names))
        for module in sorted(used):
            assert _distributions(module) & allowed, f"{folder} imports {module!r}: not in the {names} extras"


def test_export_imports_are_declared():
    base, extras = _pyproject()
    _, every = _imports(_py("export"))
    for module in sorted(every):
        assert _distributions(module) & (base | extras["export"] | extras["cpu"]), (
            f"export/ imports {module!r}: not in the base dependencies or the export extra"
        )


def test_declared_packages_are_imported():
    base, extras = _pyproject()
    _, runtime = _imports(_py("legion_rt"))
    runtime_dists = set().union(*(_distributions(m) for m in runtime))
    for dist in sorted(base):
        assert dist in runtime_dists, f"{dist} is a base dependency but legion_rt never imports it"
    _, anywhere = _imports(_py("legion_rt") + _py("export") + _py("tests") + _py("benchmarks"))
    used = set().union(*(_distributions(m) for m in anywhere))
    for extra, dists in extras.items():
        for dist in sorted(dists):
            if (
                dist in INDIRECT or dist == "legion-rt"
            ):  # an extra that includes another extra of this package
                continue
            assert dist in used, f"extra {extra!r} declares {dist}, which nothing in the repository imports"


def test_the_export_stage_has_one_import_name():
    """`legion_rt.export` everywhere (wheel and checkout alike); nothing imports the folder as top-level `export`."""
    offenders = []
    for path in _py("legion_rt") + _py("export") + _py("tests") + _py("benchmarks"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if isinstance(node, ast.Constant) and isinstance(
                node.value, str
            ):  # monkeypatch / import_module targets
                names = [node.value] if re.fullmatch(r"export(\.[A-Za-z_]\w*)+", node.value) else []
            if any(n == "export" or n.startswith("export.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
    import legion_rt.export.config as cfg

    assert Path(cfg.__file__).resolve() == REPO / "export" / "config.py"
