"""The stage packages of KneeReconLib (docs/architecture.md): every import, function-level ones
included, goes to the same stage or a lower one, and no modules import each other in a circle.
Also: the public API at the top, and model files that name no module of KneeReconLib (so moving
modules cannot break loading them)."""
import ast
import glob
import os
import pickletools
import zipfile

import pytest

from conftest import ROOT

LIB = os.path.join(ROOT, "KneeReconLib")
PKG = "KneeReconLib"
# lowest first: a module may import from its own stage and from the stages before it
STAGES = ["core", "io", "geometry", "data", "models", "reconstruction", "evaluation", "training", "baselines"]
TOP = {"__init__", "__main__", "cli"}  # the public API and the command line, above every stage


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(src: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `src` imports, at any depth of the code (lazy imports included):
    `from ..core import labels` -> KneeReconLib.core.labels, `from .network import UNet3D` -> its module."""
    pkg = module.split(".") if is_package else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in known:  # the name is a module
                    out.add(f"{target}.{a.name}")
                elif target in known:
                    out.add(target)
    out.discard(module)
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports. sources: module -> (source text, is a package)."""
    return {mod: _imports(src, mod, is_pkg, set(sources)) for mod, (src, is_pkg) in sources.items()}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and parts[1] in STAGES):
        return parts[1]
    return None  # the top: KneeReconLib, KneeReconLib.cli, KneeReconLib.__main__


def violations(graph: dict[str, set[str]]) -> list[str]:
    """A lower stage importing a higher one, a stage importing the top, or a module of the top that is
    not in TOP."""
    out = []
    for mod, deps in sorted(graph.items()):
        s = stage_of(mod)
        if s is None:
            if mod != PKG and mod.split(".")[1] not in TOP:
                out.append(f"{mod}: a module at the top of KneeReconLib; put it in a stage package")
            continue
        if s not in STAGES:
            out.append(f"{mod}: stage {s!r} is not in the stage order (docs/architecture.md)")
            continue
        for d in sorted(deps):
            t = stage_of(d)
            if t is None:
                out.append(f"{mod} ({s}) imports {d} (the top)")
            elif t in STAGES and STAGES.index(t) > STAGES.index(s):
                out.append(f"{mod} ({s}) imports {d} ({t}, a higher stage)")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module, or a self-import)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def library_sources() -> dict[str, tuple[str, bool]]:
    paths = [p for p in glob.glob(os.path.join(LIB, "**", "*.py"), recursive=True) if "__pycache__" not in p]
    return {_module_name(p): (open(p, encoding="utf-8").read(), p.endswith("__init__.py")) for p in paths}


@pytest.fixture(scope="module")
def sources():
    src = library_sources()
    if not any(m.count(".") >= 2 for m in src):  # no module in a subpackage
        pytest.skip("KneeReconLib is still flat: run `python tools/restructure.py` (docs/architecture.md)")
    return src


def test_stages_import_only_lower_stages_and_no_circles(sources):
    graph = import_graph(sources)
    assert {m for m in graph if stage_of(m)} >= {f"{PKG}.{s}" for s in STAGES}, "a stage package is missing"
    # the walk sees the imports that matter (lazy ones too): not a vacuous pass
    assert "KneeReconLib.models.checkpoint" in graph["KneeReconLib.reconstruction.inference"]  # inside a method
    assert "KneeReconLib.geometry.backprojection" in graph["KneeReconLib.data.dataset"]
    assert violations(graph) == []
    assert cycles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_circle(sources):
    bad = dict(sources)
    net = "KneeReconLib.models.network"
    bad[net] = (sources[net][0] + "\n\ndef _f():\n    from ..training import train\n", False)
    assert violations(import_graph(bad)) == [f"{net} (models) imports KneeReconLib.training.train (training, a higher stage)"]
    bad = dict(sources)  # the old circle: network's build_network importing chen_net, which imports network
    bad[net] = (sources[net][0] + "\n\ndef _f():\n    from .chen_net import ChenNet\n", False)
    assert ["KneeReconLib.models.chen_net", net] in cycles(import_graph(bad))
    bad = dict(sources)
    bad["KneeReconLib.io.fileio"] = (sources["KneeReconLib.io.fileio"][0] + "\nfrom .. import __version__\n", False)
    assert violations(import_graph(bad)) == ["KneeReconLib.io.fileio (io) imports KneeReconLib (the top)"]
    bad = dict(sources)
    bad["KneeReconLib.stray"] = ("", False)
    assert violations(import_graph(bad)) == ["KneeReconLib.stray: a module at the top of KneeReconLib; put it in a stage package"]


def test_every_stage_says_what_it_holds(sources):
    for s in STAGES:
        tree = ast.parse(sources[f"{PKG}.{s}"][0])
        doc = ast.get_docstring(tree)
        assert doc and len(doc) > 40, f"KneeReconLib/{s}/__init__.py needs a docstring saying what it holds"
        assert len(tree.body) == 1, f"KneeReconLib/{s}/__init__.py holds only its docstring"


def test_public_api_at_the_top(sources):
    import KneeReconLib
    from KneeReconLib.core.errors import KneeReconError
    from KneeReconLib.reconstruction.inference import Reconstruction

    assert KneeReconLib.KneeReconError is KneeReconError
    assert KneeReconLib.Reconstruction is Reconstruction
    assert callable(KneeReconLib.reconstruct) and KneeReconLib.__version__
    with pytest.raises(AttributeError, match="no attribute 'inference'"):
        KneeReconLib.__getattr__("inference")


def _pickle_globals(path: str) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    out, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "GLOBAL":
            out.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]}.{strings[-1]}")
    return out


def test_model_files_name_no_module_of_the_library():
    models = glob.glob(os.path.join(ROOT, "Resources", "Models", "*.pt"))
    assert len(models) >= 3
    for m in models:
        names = _pickle_globals(m)
        assert names, m  # the walk reads the pickle (an OrderedDict at least)
        assert not [n for n in names if n.startswith(PKG)], (m, names)
