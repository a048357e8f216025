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
