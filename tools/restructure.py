"""Regroup KneeReconLib's flat modules into stage packages (issue 17), history kept: `git mv`, then
every import and module reference in the repository rewritten to the new paths.

Run from the repository root:  python tools/restructure.py  [--dry-run]

Deterministic and idempotent: a second run changes nothing, and a run after more flat modules (or
flat-layout imports) were merged moves and rewrites just those. It stops before changing anything
when a module at KneeReconLib/'s top level is not in MAPPING (add it there, in the lowest stage its
imports allow: docs/architecture.md); Testing/test_architecture.py then checks the stage order.

What it does:
1. `git mv KneeReconLib/<m>.py KneeReconLib/<stage>/<m>.py` for every module in MAPPING still at the top;
2. writes each stage's __init__.py (one docstring, STAGES);
3. moves the symbols in SYMBOL_MOVES into their own module (build_network out of network.py, which
   breaks the network <-> chen_net import circle);
4. rewrites, in KneeReconLib/, KneeRecon/, Testing/, scripts/, bench/, tools/ and docs/: relative and absolute imports
   (with `ast`, function-level ones included; `from . import a, b` is split by destination),
   dotted references in strings and code ("KneeReconLib.inference.x" for monkeypatch, mock.patch,
   importlib, `python -m`), and source paths ("KneeReconLib/drr.py") in comments and Markdown;
5. adds the stage packages to the `packages = [...]` lists of pyproject.toml / setup.py.
The Slicer module's CMake list globs KneeReconLib/ recursively (KneeReconFiles.cmake), so it needs
nothing; the script checks that it still does."""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import textwrap

PKG = "KneeReconLib"
TOP_LEVEL = {"__init__", "__main__", "cli"}  # stay at the top: the public API and the command line

# stage -> the docstring of its __init__.py; lowest first (the import order docs/architecture.md shows)
STAGES = {
    "core": "What every stage shares, importing nothing of KneeReconLib: the error type (exit 2), the label "
            "table, DESIGN.md's views and reconstruction grid, and the n-d image filters (numpy, SimpleITK) "
            "used from io up.",
    "io": "Files in and out: radiograph reading and writing, atomic file helpers, the .seg.nrrd writer, "
          "intensity preprocessing, input validation and where the bundled resources are.",
    "geometry": "Frames and projection: CT frames, back-projection of the two views into the grid, the "
                "height-offset alignment. No networks.",
    "data": "Training anatomy and images: the procedural phantoms, the LLP26 bone population, DRRs, the "
            "radiograph simulator and the training data sets (caches). No networks.",
    "models": "The networks and their files: the 3D U-Net and its fused inference form, the Chen network, "
              "the style-transfer network, model files and cards, and the OpenVINO runtime.",
    "reconstruction": "X-rays to bones: the reconstructor, label clean-up, surfaces, the overlay, the "
                      "output folder, batches and the quality report. Knows nothing of training.",
    "evaluation": "Scores: Dice and surface metrics, and the 3D and 2D evaluation of a model.",
    "training": "Learning: the losses and the training loop.",
    "baselines": "The paper's comparison systems: shape models, 2D/3D shape-model registration and the "
                 "side-by-side method comparison.",
}

# old flat module -> its stage (or "stage.new_name"). Every KneeReconLib/*.py but TOP_LEVEL must be here.
MAPPING = {
    # core
    "errors": "core", "labels": "core", "geometry": "core",
    # io
    "fileio": "io", "xray_io": "io", "segfile": "io", "preprocessing": "io", "resources": "io",
    "validation": "io",  # issue 16a: numeric/input validation
    "view_check": "io", "views": "io",  # issue 16: the view/side check (whichever name it lands with)
    # geometry
    "frame": "geometry", "backprojection": "geometry", "alignment": "geometry",
    "ndfilters": "core",  # issue 15: scipy-free filters (numpy, SimpleITK); used from io (view_check) up
    # data
    "phantom": "data", "llp26": "data", "drr": "data", "realism": "data", "dataset": "data",
    # models
    "network": "models", "chen_net": "models", "fused_unet": "models", "checkpoint": "models",
    "model_card": "models", "openvino_backend": "models",
    "style": "models",  # the reconstructor runs StyleTransfer, so it sits below reconstruction
    # reconstruction
    "inference": "reconstruction", "surfaces": "reconstruction", "overlay": "reconstruction",
    "outputs": "reconstruction", "batch": "reconstruction",
    "quality": "reconstruction",  # issue 16b: the reconstruction quality report
    "refine": "reconstruction",  # issue 16b: labels on a finer grid from the network's scores
    # evaluation
    "metrics": "evaluation", "evaluate": "evaluation", "evaluate2d": "evaluation",
    # training
    "losses": "training", "train": "training",
    # baselines
    "shape_model": "baselines", "registration": "baselines", "comparison": "baselines",
}

# (new module, symbol) -> new module it moves to, with the docstring and imports of that module
SYMBOL_MOVES = {
    ("models.network", "build_network"): "models.factory",
}
NEW_MODULES = {
    "models.factory": (
        '"""The network a model card\'s architecture describes (UNet3D or ChenNet). Apart from\n'
        'network.py, so that network.py and chen_net.py do not import each other."""\n'
        "from __future__ import annotations\n\n"
        "from torch import nn\n\n"
        "from ..core.errors import KneeReconError\n"
        "from .chen_net import ChenNet, ChenNetConfig\n"
        "from .network import UNet3D, UNetConfig\n"
    ),
}

# where references are rewritten; docs/architecture.md describes the new layout itself
CODE_DIRS = ("KneeReconLib", "KneeRecon", "Testing", "scripts", "bench", "docs", "tools")
TEXT_FILES = ("README.md", "BENCHMARKS.md", "pyproject.toml", "setup.py", "MANIFEST.in", "CMakeLists.txt")
TEXT_EXT = (".py", ".md", ".sh", ".cmake", ".txt", ".toml", ".in")
SKIP = {os.path.join("docs", "architecture.md"), os.path.join("tools", "restructure.py")}
WIDTH = 120


class Fail(Exception):
    pass


def new_path(old: str) -> str:
    """'geometry' -> 'core.geometry'; 'x' -> 'stage.x' or the 'stage.new_name' MAPPING gives."""
    dest = MAPPING[old]
    return dest if "." in dest else f"{dest}.{old}"


def _modules_now(root: str) -> set[str]:
    """Dotted names (below KneeReconLib) of the modules and packages in the tree now."""
    out = set()
    lib = os.path.join(root, PKG)
    for d, dirs, files in os.walk(lib):
        dirs[:] = [x for x in dirs if x != "__pycache__" and x != "Resources" and not x.startswith(".")]
        rel = os.path.relpath(d, lib)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        if prefix:
            out.add(prefix[:-1])
        out |= {prefix + f[:-3] for f in files if f.endswith(".py") and f != "__init__.py"}
    return out


def _stage_modules() -> dict[str, set[str]]:
    by = {s: set() for s in STAGES}
    for old in MAPPING:
        s, m = new_path(old).split(".")
        by[s].add(m)
    for mod in NEW_MODULES:
        s, m = mod.split(".")
        by[s].add(m)
    return by


STAGE_MODULES = _stage_modules()


def resolve(parts: list[str]) -> list[str]:
    """A module path below KneeReconLib, as the flat layout or the new one spells it, in the new layout.
    New-style paths (a stage followed by one of its modules, or a stage that is no old module) are kept;
    the one name in both ('geometry': old module, new stage) is new-style only when a module of the
    stage follows."""
    if not parts:
        return parts
    head = parts[0]
    if head in STAGES and (head not in MAPPING or (len(parts) > 1 and parts[1] in STAGE_MODULES[head])):
        return parts
    if head in MAPPING:
        return new_path(head).split(".") + parts[1:]
    return parts


def _symbol_home(mod: list[str], name: str) -> list[str]:
    dest = SYMBOL_MOVES.get((".".join(mod), name))
    return dest.split(".") if dest else mod


def _is_module(parts: list[str], now: set[str]) -> bool:
    return ".".join(parts) in now or ".".join(parts) in NEW_MODULES


# ---------------------------------------------------------------- import statements (ast)

def _fmt_from(level: int, module: str, names: list[str], indent: str) -> str:
    head = f"from {'.' * level}{module} import "
    line = head + ", ".join(names)
    if len(indent) + len(line) <= WIDTH:
        return line
    col = len(indent) + len(head) + 1  # continuation lines under the parenthesis, the project's style
    out, cur = [], ""
    for n in names:
        if cur and col + len(cur) + len(n) + 1 > WIDTH:
            out.append(cur.rstrip())
            cur = ""
        cur += n + ", "
    out.append(cur.rstrip(", ") + ")")
    return head + "(" + ("\n" + " " * col).join(out)


def _alias(a: ast.alias) -> str:
    return a.name if not a.asname else f"{a.name} as {a.asname}"


def _rewrite_from(node: ast.ImportFrom, file_pkg: list[str] | None,
                  now: set[str]) -> list[tuple[list[str], list[str], bool]] | None:
    """[(module parts below KneeReconLib, aliases, relative?)] this import becomes, or None when it is
    not KneeReconLib's or needs no change."""
    fallback = False
    if node.level:
        if file_pkg is None:
            return None
        base = file_pkg[: len(file_pkg) - (node.level - 1)]
        mod = node.module.split(".") if node.module else []
        target = base + mod
        if mod:
            ok = _is_module(target, now)
        else:
            ok = all(_is_module(target + [a.name], now) or not _maybe_module(a.name) for a in node.names)
        if not ok:  # a flat-layout import in a moved file: read it as the flat layout meant it
            target, fallback = mod, True
        rel = True
    else:
        if not node.module or node.module.split(".")[0] != PKG:
            return None
        target = node.module.split(".")[1:]
        rel = False
    groups: dict[tuple[str, ...], list[str]] = {}
    for a in node.names:
        full = resolve(target + [a.name])  # the name may be a module: `from KneeReconLib import resources`
        dest_mod, dest_name = _symbol_home(full[:-1], full[-1]), full[-1]
        alias = _alias(a) if dest_name == a.name else f"{dest_name} as {a.asname or a.name}"
        groups.setdefault(tuple(dest_mod), []).append(alias)
    if not fallback and list(groups) == [tuple(target)] and groups[tuple(target)] == list(map(_alias, node.names)):
        return None
    return [(list(k), v, rel) for k, v in groups.items()]


def _maybe_module(name: str) -> bool:
    return name in MAPPING or name in STAGES


def _relative(file_pkg: list[str], target: list[str]) -> tuple[int, str]:
    common = 0
    while common < min(len(file_pkg), len(target)) and file_pkg[common] == target[common]:
        common += 1
    return len(file_pkg) - common + 1, ".".join(target[common:])


def rewrite_imports(src: str, file_pkg: list[str] | None, now: set[str]) -> str:
    """Import statements of `src` in the new layout. file_pkg: the package the file is in, below
    KneeReconLib (None outside the library: relative imports there are not KneeReconLib's)."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return src
    lines = src.splitlines(keepends=True)
    offsets = [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            groups = _rewrite_from(node, file_pkg, now)
            if groups is None:
                continue
            indent = re.match(r"\s*", lines[node.lineno - 1]).group(0)
            stmts = []
            for target, names, rel in groups:
                if rel:
                    level, module = _relative(file_pkg, target)
                else:
                    level, module = 0, ".".join([PKG] + target)
                stmts.append(_fmt_from(level, module, names, indent))
            starts_line = lines[node.lineno - 1][: node.col_offset].strip() == ""
            edits.append((node, ("\n" + indent if starts_line else "; ").join(stmts)))
        elif isinstance(node, ast.Import):
            names, changed = [], False
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == PKG and len(parts) > 1:
                    new = resolve(parts[1:])
                    changed |= new != parts[1:]
                    names.append(".".join([PKG] + new) + (f" as {a.asname}" if a.asname else ""))
                else:
                    names.append(_alias(a))
            if changed:
                edits.append((node, "import " + ", ".join(names)))
    for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        a = offsets[node.lineno - 1] + len(lines[node.lineno - 1].encode()[: node.col_offset].decode())
        b = offsets[node.end_lineno - 1] + len(lines[node.end_lineno - 1].encode()[: node.end_col_offset].decode())
        comments = re.findall(r"#[^\n]*", src[a:b])  # e.g. `# noqa: E402` inside a wrapped import
        tail = re.match(r"[ \t]*(#[^\n]*)", src[b:])
        if tail and "\n" in text:  # a line's comment stays on the statement's first line (where noqa acts)
            comments.append(tail.group(1))
            b += tail.end()
        if comments:
            first, nl, rest = text.partition("\n")
            text = first + "  " + " ".join(comments) + nl + rest
        src = src[:a] + text + src[b:]
        lines = src.splitlines(keepends=True)
        offsets = [0]
        for ln in lines:
            offsets.append(offsets[-1] + len(ln))
    return src


IMPORT_START = re.compile(r"^([ \t]*)from (\.+|" + PKG + r"\b)([\w.]*) import ")


def sort_import_runs(src: str) -> str:
    """Runs of KneeReconLib import statements (same indentation, no other line between) in isort's
    order: absolute ones, then relative ones, farther packages first, then by module."""
    lines = src.split("\n")
    out, i = [], 0

    def unit(k):  # (statement's lines, indentation, sort key) of a statement starting at line k, or None
        m = IMPORT_START.match(lines[k])
        if not m:
            return None
        j = k
        if "(" in lines[k].split("#")[0] and ")" not in lines[k].split("#")[0]:
            while j + 1 < len(lines) and ")" not in lines[j].split("#")[0]:
                j += 1
        dots = m.group(2) if m.group(2).startswith(".") else ""
        key = (1 if dots else 0, -len(dots), (m.group(3) if dots else m.group(2) + m.group(3)).lower())
        return lines[k:j + 1], m.group(1), key

    while i < len(lines):
        u = unit(i)
        if u is None:
            out.append(lines[i])
            i += 1
            continue
        run = [u]
        i += len(u[0])
        while i < len(lines) and (v := unit(i)) and v[1] == u[1]:
            run.append(v)
            i += len(v[0])
        for stmt, _, _ in sorted(run, key=lambda x: x[2]):
            out += stmt
    return "\n".join(out)


# ---------------------------------------------------------------- references in text

DOTTED = re.compile(r"(?<![\w.])" + PKG + r"((?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w/])" + PKG + r"/([A-Za-z_]\w*)\.py\b")
# (a statement in a string of code may follow a "\n" escape)
FROM_IN_TEXT = re.compile(r"(?:(?<=\\[nt])|(?<![\w.]))from " + PKG + r" import ([A-Za-z_]\w*(?:, *[A-Za-z_]\w*)*)")


def _dotted(m: re.Match) -> str:
    parts = m.group(1)[1:].split(".")
    after = re.match(r"\s+import\s+\(?\s*(\w+)", m.string[m.end():])
    if len(parts) == 1 and parts[0] in STAGES and after and after.group(1) in STAGE_MODULES[parts[0]]:
        return m.group(0)  # `from KneeReconLib.geometry import ndfilters`: the stage, already new-style
    new = resolve(parts)
    for i in range(1, len(new)):  # a moved symbol: KneeReconLib.models.network.build_network
        dest = SYMBOL_MOVES.get((".".join(new[:i]), new[i]))
        if dest:
            new = dest.split(".") + new[i:]
            break
    return PKG + "." + ".".join(new)


def _from_in_text(m: re.Match, where: str) -> str:
    names = [n.strip() for n in m.group(1).split(",")]
    mods = [n for n in names if n in MAPPING]
    if not mods:
        return m.group(0)
    homes = {tuple(new_path(n).split(".")[:-1]) for n in mods}
    if len(mods) != len(names) or len(homes) != 1:
        raise Fail(f"{where}: cannot split {m.group(0)!r} inside a string; write one import per stage there")
    return f"from {PKG}.{'.'.join(homes.pop())} import {', '.join(names)}"


def rewrite_text(text: str, where: str) -> str:
    text = PATH.sub(lambda m: f"{PKG}/{new_path(m.group(1)).replace('.', '/')}.py" if m.group(1) in MAPPING
                    else m.group(0), text)
    text = FROM_IN_TEXT.sub(lambda m: _from_in_text(m, where), text)
    return DOTTED.sub(_dotted, text)


def rewrite_package_lists(text: str) -> str:
    """`packages = ["KneeReconLib", ...]` (pyproject.toml, setup.py): the stage packages after the top one."""
    def fix(m):
        items = re.findall(r"[\"']([^\"']+)[\"']", m.group(2))
        if PKG not in items:
            return m.group(0)
        q = '"' if '"' in m.group(2) else "'"
        want = [f"{PKG}.{s}" for s in STAGES]
        i = items.index(PKG) + 1
        items = items[:i] + [w for w in want if w not in items] + items[i:]
        one = m.group(1) + "[" + ", ".join(f"{q}{x}{q}" for x in items) + "]"
        if len(one) <= WIDTH:
            return one
        return m.group(1) + "[\n" + "".join(f"    {q}{x}{q},\n" for x in items) + "]"
    return re.sub(r"(\bpackages\s*=\s*)\[([^\]]*)\]", fix, text)


# ---------------------------------------------------------------- the steps

def git(root: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def check_mapping(root: str) -> list[tuple[str, str]]:
    """(old path, new path) of each move to make; Fail listing every unmapped top-level module."""
    lib = os.path.join(root, PKG)
    flat = sorted(f[:-3] for f in os.listdir(lib) if f.endswith(".py") and f[:-3] not in TOP_LEVEL)
    unmapped = [m for m in flat if m not in MAPPING]
    if unmapped:
        raise Fail("modules not in tools/restructure.py MAPPING (add each to the lowest stage its imports allow, "
                   "docs/architecture.md): " + ", ".join(f"KneeReconLib/{m}.py" for m in unmapped))
    moves = []
    for m in flat:
        dst = os.path.join(PKG, *new_path(m).split(".")) + ".py"
        if os.path.exists(os.path.join(root, dst)):
            raise Fail(f"both KneeReconLib/{m}.py and {dst} exist: merge them by hand first")
        moves.append((os.path.join(PKG, m + ".py"), dst))
    stale = [s for s in STAGES if os.path.isfile(os.path.join(lib, s + ".py")) and s not in MAPPING]
    if stale:
        raise Fail(f"a module has a stage's name: {stale}")
    cm = os.path.join(root, "KneeRecon", "KneeReconFiles.cmake")
    if os.path.isfile(cm) and "GLOB_RECURSE" not in open(cm).read():
        raise Fail("KneeRecon/KneeReconFiles.cmake no longer globs KneeReconLib recursively: list the stage folders there")
    return moves


def write_inits(root: str, dry: bool) -> list[str]:
    written = []
    for stage, doc in STAGES.items():
        path = os.path.join(root, PKG, stage, "__init__.py")
        body = '"""' + "\n".join(textwrap.wrap(doc, 100)) + '"""\n'
        if os.path.isfile(path) and open(path).read() == body:
            continue
        written.append(path)
        if not dry:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(body)
    return written


def _drop_unused_imports(src: str) -> str:
    tree = ast.parse(src)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
           {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    lines = src.splitlines(keepends=True)
    for node in reversed(tree.body):
        if isinstance(node, ast.ImportFrom) and node.level and node.lineno == node.end_lineno:
            keep = [a for a in node.names if (a.asname or a.name) in used]
            if len(keep) == len(node.names):
                continue
            line = lines[node.lineno - 1]
            indent = re.match(r"\s*", line).group(0)
            lines[node.lineno - 1] = (indent + f"from {'.' * node.level}{node.module or ''} import "
                                      + ", ".join(map(_alias, keep)) + "\n") if keep else ""
    return re.sub(r"\n{4,}", "\n\n\n", "".join(lines))


def move_symbols(root: str, dry: bool) -> list[str]:
    """Cut each SYMBOL_MOVES function out of its module into the new module (once)."""
    changed = []
    for (src_mod, name), dst_mod in sorted(SYMBOL_MOVES.items()):
        src_path = os.path.join(root, PKG, *src_mod.split(".")) + ".py"
        dst_path = os.path.join(root, PKG, *dst_mod.split(".")) + ".py"
        if not os.path.isfile(src_path):
            continue
        src = open(src_path).read()
        node = next((n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            if not os.path.isfile(dst_path):
                raise Fail(f"{name} is in neither {src_path} nor {dst_path}")
            continue
        lines = src.splitlines(keepends=True)
        first = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        code = "".join(lines[first:node.end_lineno])
        # its lazy imports of modules that import the source module become the new module's imports
        code = re.sub(r"\n[ \t]+from \.[\w.]* import [^\n]*# here:[^\n]*\n(?:[ \t]*\n)?", "\n", code)
        rest = _drop_unused_imports("".join(lines[:first]) + "".join(lines[node.end_lineno:]))
        head = NEW_MODULES[dst_mod] if not os.path.isfile(dst_path) else open(dst_path).read().rstrip("\n") + "\n"
        changed += [src_path, dst_path]
        if not dry:
            with open(src_path, "w") as f:
                f.write(rest)
            with open(dst_path, "w") as f:
                f.write(head + "\n\n" + code)
    return changed


def _files(root: str):
    for d in CODE_DIRS:
        for dp, dirs, files in os.walk(os.path.join(root, d)):
            dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "Resources") and not x.startswith("."))
            for f in sorted(files):
                if f.endswith(TEXT_EXT):
                    yield os.path.relpath(os.path.join(dp, f), root)
    for f in TEXT_FILES:
        if os.path.isfile(os.path.join(root, f)):
            yield f


def rewrite_all(root: str, dry: bool) -> list[str]:
    now = _modules_now(root) | {m for m in NEW_MODULES}
    changed = []
    for rel in _files(root):
        if rel in SKIP:
            continue
        path = os.path.join(root, rel)
        text = open(path, encoding="utf-8").read()
        new = text
        if rel.endswith(".py"):
            parts = rel[:-3].split(os.sep)
            file_pkg = parts[1:-1] if parts[0] == PKG else None
            new = rewrite_imports(new, file_pkg, now)
            if new != text:
                new = sort_import_runs(new)
        if os.path.basename(rel) in ("pyproject.toml", "setup.py"):
            # the package lists name the stages themselves ("KneeReconLib.geometry" is the package there)
            pieces = re.split(r"(\bpackages\s*=\s*\[[^\]]*\])", new)
            new = rewrite_package_lists("".join(p if i % 2 else rewrite_text(p, rel) for i, p in enumerate(pieces)))
        else:
            new = rewrite_text(new, rel)
        if new != text:
            changed.append(rel)
            if not dry:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    ap.add_argument("--root", default=".", help="repository root (default: the current folder)")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    if not os.path.isdir(os.path.join(root, PKG)):
        print(f"error: no {PKG}/ in {root}: run from the repository root", file=sys.stderr)
        return 2
    try:
        moves = check_mapping(root)
        for stage in STAGES:
            if not args.dry_run:
                os.makedirs(os.path.join(root, PKG, stage), exist_ok=True)
        for src, dst in moves:
            print(f"git mv {src} {dst}")
            if not args.dry_run:
                git(root, "mv", src, dst)
        if args.dry_run and moves:
            print("(dry run: the rewrites below are computed on the layout as it is now)")
        inits = write_inits(root, args.dry_run)
        moved = move_symbols(root, args.dry_run) if not args.dry_run else []
        changed = rewrite_all(root, args.dry_run)
        for p in inits + moved + changed:
            print(f"wrote {os.path.relpath(p, root) if os.path.isabs(p) else p}")
        if not args.dry_run:
            touched = [os.path.relpath(p, root) if os.path.isabs(p) else p for p in inits + moved + changed]
            if touched:
                git(root, "add", "--", *sorted(set(touched)))
    except (Fail, subprocess.CalledProcessError) as e:
        msg = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
