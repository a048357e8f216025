"""Checks on the Slicer module that need no Slicer application: it compiles, imports no torch or
scikit-image at load time, and every GUI widget is bound to a parameter-node field."""
import ast
import os
import py_compile
import xml.etree.ElementTree as ET

from conftest import ROOT

MODULE_DIR = os.path.join(ROOT, "KneeRecon")


def _top_level_imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in tree.body:  # module level only: imports inside functions run on use
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_module_files_compile_without_heavy_imports():
    heavy = {"torch", "skimage"}  # Slicer loads the module before these exist
    qt_side = {"qt", "ctk", "slicer.ScriptedLoadableModule"}  # absent under slicer-core
    for f, forbidden in (("KneeRecon.py", heavy), ("KneeReconMRMLLogic.py", heavy | qt_side)):
        path = os.path.join(MODULE_DIR, f)
        py_compile.compile(path, doraise=True)
        imports = {i.split(".")[0] for i in _top_level_imports(path)} | _top_level_imports(path)
        assert not imports & forbidden, (f, imports & forbidden)


def test_ui_widgets_match_parameter_node():
    tree = ast.parse(open(os.path.join(MODULE_DIR, "KneeRecon.py")).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KneeReconParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    ui = ET.parse(os.path.join(MODULE_DIR, "Resources", "UI", "KneeRecon.ui"))
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound == fields, (bound ^ fields)
    names = {w.get("name") for w in ui.iter("widget")}
    src = open(os.path.join(MODULE_DIR, "KneeRecon.py")).read()
    for used in ("applyButton", "cancelButton", "exportButton", "progressBar", "statusLabel", "sidSpinBox", "sodSpinBox"):
        assert used in names and f"self.ui.{used}" in src, used


def test_views_as_given_checkbox_reaches_the_logic():
    """The 'Views as given' checkbox: in the .ui, bound to the parameter node's viewsAsGiven (a
    bool, off by default), and passed to the logic's reconstruct; a swapped-views refusal is shown
    in the status line too."""
    ui = ET.parse(os.path.join(MODULE_DIR, "Resources", "UI", "KneeRecon.ui"))
    box = next(w for w in ui.iter("widget") if w.get("name") == "viewsAsGivenCheckBox")
    assert box.get("class") == "QCheckBox"
    bound = {p.get("name"): p.find("string").text for p in box.iter("property") if p.find("string") is not None}
    assert bound["SlicerParameterName"] == "viewsAsGiven" and "swapped" in bound["text"]
    tree = ast.parse(open(os.path.join(MODULE_DIR, "KneeRecon.py")).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KneeReconParameterNode")
    field = next(n for n in cls.body if isinstance(n, ast.AnnAssign) and n.target.id == "viewsAsGiven")
    assert ast.unparse(field.annotation) == "bool" and field.value.value is False
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "self.logic.reconstruct"]
    assert len(calls) == 1
    kw = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    assert kw["viewsAsGiven"] == "p.viewsAsGiven"
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KneeReconWidget")
    handlers = [h for h in ast.walk(widget) if isinstance(h, ast.ExceptHandler) and h.type is not None]
    swapped = next(h for h in handlers if ast.unparse(h.type) == "SwappedViewsError")
    assert "self.ui.statusLabel.text" in ast.unparse(swapped) and isinstance(swapped.body[-1], ast.Raise)
