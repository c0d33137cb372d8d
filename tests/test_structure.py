"""The shape of the code base: no import cycle, small modules, a torch-free configuration check."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "hesscale")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import agents.x.y` -> the nearest module
                target = target.rpartition(".")[0]
            if not target:
                continue
            # importing a module also runs its packages' __init__ (unless already being imported)
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep != name and not name.startswith(dep + "."):
                    found.add(dep)
    return found


def test_no_import_cycle_among_the_projects_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["agents.experiment.run"] >= {"agents.experiment.validation", "agents.experiment.build"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cycle_finder_sees_function_level_imports(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from agents.experiment import run\n")
    assert "agents.experiment.run" in _imports("agents.fake", f, _modules())


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) > 100  # the walk found the sources
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}; split them by job"


def test_a_configuration_error_answers_without_importing_torch_or_sb3(tmp_path: Path):
    code = f"""
import sys
from hydra import compose, initialize_config_dir
from agents.experiment.errors import ConfigError
from agents.experiment.run import train
with initialize_config_dir({str(ROOT / 'configs')!r}, version_base="1.3"):
    cfg = compose("config", overrides=["opt=hesscale", "opt.curvature=hessian", "agent.kwargs.gamma=2"])
try:
    train(cfg, {str(tmp_path / 'run')!r})
except ConfigError as e:
    print("ConfigError:", e)
print("loaded:", sorted(m for m in ("torch", "stable_baselines3", "gymnasium") if m in sys.modules))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "opt.curvature='hessian'" in p.stdout and "agent.kwargs.gamma=2" in p.stdout, p.stdout
    assert "loaded: []" in p.stdout, p.stdout


def test_the_public_subpackages_are_attributes_after_a_bare_import():
    """``import hesscale`` then ``hesscale.optim.AdaHesScale`` (the README's spelling), in a fresh
    interpreter where nothing else imported the subpackage first."""
    code = "import hesscale; print(hesscale.optim.AdaHesScale.__name__, 'optim' in dir(hesscale))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["AdaHesScale", "True"]


def _without_reference_test(type_names: list[str]) -> list[str]:
    """Those of ``type_names`` that no test comparing against an independent reference
    (``tests/reference.py``, BackPACK) builds as ``nn.<Type>(...)``."""
    sources = [f.read_text() for f in sorted((ROOT / "tests").rglob("test_*.py"))]
    reference_tests = [s for s in sources if re.search(r"^from (reference|backpack)\b|^import backpack", s, re.M)]
    assert len(reference_tests) >= 3
    return [name for name in type_names if not any(re.search(rf"\bnn\.{name}\(", s) for s in reference_tests)]


def test_every_rule_in_the_registry_has_a_reference_test():
    """The list of module types tested against references is the rule registry's: a new rule
    whose module type no reference test builds fails here."""
    import hesscale

    assert _without_reference_test(["Linear", "NoSuchModule"]) == ["NoSuchModule"]
    untested = _without_reference_test(hesscale.supported_types())
    assert not untested, f"rules without a reference test: {untested}"


#: test folders and the code each mirrors; only project-wide tests live in tests/ itself
TEST_FOLDERS = {"core": "hesscale", "optim": "hesscale/optim", "agents": "agents",
                "experiment": "agents/experiment", "scripts": "scripts"}
PROJECT_WIDE_TESTS = {"test_readme.py", "test_structure.py"}


def test_tests_mirror_the_code():
    """Every test file sits in the folder of the code it tests (``tests/core/test_core_*.py`` ...)."""
    misplaced = sorted(f.name for f in (ROOT / "tests").glob("test_*.py") if f.name not in PROJECT_WIDE_TESTS)
    assert not misplaced, f"move into tests/<{'|'.join(TEST_FOLDERS)}>/: {misplaced}"
    folders = {f.parent.name for f in (ROOT / "tests").rglob("test_*.py")} - {"tests"}
    assert folders <= set(TEST_FOLDERS), folders - set(TEST_FOLDERS)
    assert all((ROOT / code).is_dir() for code in TEST_FOLDERS.values())
