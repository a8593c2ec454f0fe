"""The package's layout: a layered import graph without circles, and one list of console scripts.

Every module of ``pahubert_plugin`` is parsed with ``ast`` (nothing is imported) and its imports of
other package modules become edges, wherever they sit: imports inside functions (the lazy imports
that keep ``--help`` instant) count as much as those at the top of a file, and so do imports under
``if TYPE_CHECKING:``. Package ``__init__`` files that import their submodules dynamically
(``pkgutil.iter_modules(__path__)``: models, tasks, criterions register that way) get an edge to
every submodule, and ``separation/__init__.py`` one to each module its lazy ``_EXPORTS`` re-export.

The one kind of import not counted: Python runs a package's ``__init__`` before any of its
submodules, so ``from ..frames import x`` also runs ``pahubert_plugin/__init__.py``. That is how
a fairseq user dir works (``import pahubert_plugin`` registers the components); counting it would
make every module depend on the top, so only written imports count.
"""
import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pahubert_plugin"

# The floors, lowest first. A module may import modules on its own floor or below, never above.
# Patterns are fnmatch patterns on dotted names relative to the package ("" is the package itself);
# a module takes the floor of the first pattern it matches, and every module must match one.
FLOORS = [
    ("ground", [  # no knowledge of fairseq models, tasks or the CLIs: helpers everything else builds on
        "fileio", "frames", "metrics", "checkpoint", "configs",
        "training",  # the save_dir guard around fairseq's checkpoint functions (uses checkpoint only)
        "data.audio", "data.corpus_layout",
        "separation.memory", "separation.writing", "separation.overlap",
    ]),
    ("middle", [  # fairseq components, data sets, feature readers, corpora, the Separator API
        "data", "data.*", "clustering", "clustering.*", "models", "models.*", "tasks", "tasks.*",
        "criterions", "criterions.*", "corpora", "corpora.*",
        "separation", "separation.api",
        "separation.inference",  # optimize_for_inference folds the BatchNorm of models.blocks.ResUnit
        "registry",  # register() imports models, tasks and criterions
    ]),
    ("top", [  # console scripts and the package root: nothing in the package imports them
        "", "separate", "evaluate", "port_hubert", "plot_log",
    ]),
]


def _modules():
    """{dotted name relative to the package: path} of every module of the package."""
    root = REPO / PACKAGE
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _floor(name):
    for level, (floor, patterns) in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return level, floor
    raise AssertionError(f"{PACKAGE}.{name} is on no floor: add it to FLOORS in tests/test_layout.py")


def _target(name):
    """The package module ``name`` (relative dotted) resolves to, or its closest package parent."""
    while name not in MODULES:
        if "." not in name:
            return "" if name else None
        name = name.rsplit(".", 1)[0]
    return name


def _edges(name, path):
    """The package modules ``name`` imports (see the module docstring for what counts)."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    if not is_package:
        here = here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(_target(alias.name[len(PACKAGE) + 1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else list(here)
                base = ".".join(base + ([node.module] if node.module else []))
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:]
            else:
                continue
            for alias in node.names:  # "from . import models" imports the module models
                full = f"{base}.{alias.name}" if base else alias.name
                found.add(full if full in MODULES else _target(base))
    if is_package and "iter_modules(__path__)" in source:  # imports every submodule
        found.update(m for m in MODULES if m.startswith(f"{name}.") and "." not in m[len(name) + 1:]
                     and not m.rsplit(".", 1)[1].startswith("_"))
    for node in tree.body:  # separation/__init__.py: the modules its lazy re-exports import
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            found.update(f"{name}.{m}" for m in ast.literal_eval(node.value).values())
    found.discard(None)
    found.discard(name)
    return found


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _label(name):
    return f"{PACKAGE}.{name}" if name else PACKAGE


def test_every_module_is_on_a_floor_and_every_edge_resolves():
    for name, deps in GRAPH.items():
        _floor(name)
        assert deps <= set(MODULES), (name, deps - set(MODULES))


def test_the_graph_sees_lazy_and_dynamic_imports():
    """The parser itself: a lazy import inside a function, a relative import two levels up, the
    dynamic registration of models and the lazy re-exports of separation are all edges."""
    assert "separation.overlap" in GRAPH["separation.api"]  # inside Separator._apply
    assert "registry" in GRAPH["separation.api"]  # inside load_separation_model
    assert "data.audio" in GRAPH["separation.overlap"]  # from ..data.audio import
    assert "models.pahubert" in GRAPH["models"]  # pkgutil.iter_modules
    assert "separation.api" in GRAPH["separation"]  # _EXPORTS
    assert "models" in GRAPH["registry"]  # from . import criterions, models, tasks


def test_no_import_circles():
    done, stack = set(), []

    def visit(name):
        if name in stack:
            cycle = stack[stack.index(name):] + [name]
            raise AssertionError("import circle: " + " -> ".join(map(_label, cycle)))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_nothing_imports_upward():
    upward = []
    for name, deps in sorted(GRAPH.items()):
        level, floor = _floor(name)
        for dep in sorted(deps):
            dep_level, dep_floor = _floor(dep)
            if dep_level > level:
                upward.append(f"{_label(name)} ({floor}) imports {_label(dep)} ({dep_floor})")
    assert not upward, "\n".join(upward)


def test_nothing_imports_a_top_module():
    """Console-script modules are leaves: evaluate uses separation.api, never the separate CLI."""
    top = len(FLOORS) - 1
    wrong = [f"{_label(n)} imports {_label(d)}" for n, deps in GRAPH.items() for d in deps if _floor(d)[0] == top]
    assert not wrong, "\n".join(wrong)
    assert "separate" not in GRAPH["evaluate"] and "separation.api" in GRAPH["evaluate"]


# ---------------------------------------------------------------------------------------------
# setup.py: console scripts and version

def _setup_call():
    tree = ast.parse((REPO / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1
    return {k.arg: k.value for k in calls[0].keywords}


def console_scripts():
    """{script name: "module:function"} from setup.py's entry_points, read with ast."""
    entry_points = ast.literal_eval(_setup_call()["entry_points"])
    return dict(tuple(s.strip() for s in line.split("=")) for line in entry_points["console_scripts"])


def test_console_scripts_point_at_existing_mains():
    scripts = console_scripts()
    assert {"pahubert-toy-corpus", "pahubert-midi-corpus", "pahubert-separate", "pahubert-evaluate"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module.startswith(PACKAGE + "."), target
        path = MODULES.get(module[len(PACKAGE) + 1:])
        assert path is not None, f"{name}: no module {module}"
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert func in defined, f"{name}: {module} defines no {func}()"


def test_deferred_registration_list_matches_setup():
    """``pahubert_plugin.DEFERRING_SCRIPTS`` (a copy, since an installed package has no setup.py) names
    exactly the console scripts of setup.py: a new script must decide whether it defers registration."""
    import pahubert_plugin

    assert set(pahubert_plugin.DEFERRING_SCRIPTS) == set(console_scripts())


def test_one_version_string():
    import pahubert_plugin

    assert "version" in _setup_call() and not isinstance(_setup_call()["version"], ast.Constant), \
        "setup.py must read the version from pahubert_plugin/__init__.py, not repeat it"
    assert re.fullmatch(r"\d+\.\d+\.\d+", pahubert_plugin.__version__)
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == pahubert_plugin.__version__


@pytest.mark.parametrize("doc", ["docs/ARCHITECTURE.md"])
def test_docs_name_the_real_version_and_files(doc):
    """The architecture notes quote the package's version only, no line counts (they go stale), and only
    files that exist (paths relative to the repository or to the package)."""
    import pahubert_plugin

    text = (REPO / doc).read_text()
    version = pahubert_plugin.__version__
    for quoted in re.findall(r"\b(?:version|before|since|after|from) v?(\d+\.\d+(?:\.\d+)?)\b", text):
        assert version == quoted or version.startswith(quoted + "."), f"{doc} quotes version {quoted}, not {version}"
    assert not re.search(r"\b\d+ lines\b", text), f"{doc} quotes a line count"
    paths = set(re.findall(r"`([\w./]+\.py)(?:::\w+)?`", text)) | set(re.findall(r"^\s*(?:\w+\s+)?([\w/]+\.py)\b", text, re.M))
    assert len(paths) > 20
    for path in sorted(p for p in paths if "/my_" not in p):  # models/my_frontend.py: the extension example
        assert (REPO / path).is_file() or (REPO / PACKAGE / path).is_file(), f"{doc} names {path}, which does not exist"


def _markdown_files():
    proc = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        pytest.skip("not a git checkout: the tracked Markdown files cannot be listed")
    return [REPO / f for f in proc.stdout.split()]


def test_every_file_the_docs_name_exists():
    """A repository path quoted in any Markdown file (`tests/x.py`, `benchmarks/y.py`, ...) and every
    relative link resolve: a renamed test or script fails here, not in a reader's shell. Paths under
    a ``my_`` name are the docs' extension examples, files a user writes."""
    quoted = re.compile(r"`((?:tests|benchmarks|examples|recipes|docs|pahubert_plugin|\.ci)/[\w./-]+"
                        r"\.(?:py|sh|md|yaml|png|txt|json|safetensors))`")
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    docs = _markdown_files()
    assert len(docs) > 5
    missing = []
    for doc in docs:
        text = doc.read_text()
        for path in set(quoted.findall(text)):
            if "/my_" not in path and not (REPO / path).exists() and not (doc.parent / path).exists():
                missing.append(f"{doc.relative_to(REPO)} names {path}")
        for target in set(link.findall(text)):
            if not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)} links {target}")
    assert not missing, "files the docs name that do not exist:\n" + "\n".join(missing)


def test_the_files_make_test_starts_first_exist():
    """conftest.LONGEST_FIRST puts the minutes-long files at the head of the queue; a renamed file would
    silently fall back to the end of it."""
    import conftest

    missing = [name for name in conftest.LONGEST_FIRST if not (REPO / "tests" / name).is_file()]
    assert not missing, f"conftest.LONGEST_FIRST names files that do not exist: {missing}"
