"""Knee CT phantoms built from real people's bone surfaces: the LLP26 lower-limb shape model.

PyPI `musculoskeletal-models` (MPL-2.0) ships CT-derived surfaces of 26 adults as fieldwork
mesh parameters (a rigidly aligned left leg, patient LPS); `gias3.fieldwork` (MPL-2.0)
evaluates them. Only subjects 1-20 may be used here: 21-26, and every other source of bone
shapes, are kept for independent evaluation. Of the 20, `TEST_SUBJECTS` are our own
cross-subject test and never enter training or the shape statistics.

A knee is assembled rather than taken as the model places it (the model's femur and tibia
interpenetrate): the tibia (with its fibula) is slid along its axis to a 3-6 mm tibiofemoral
gap, the patella is set in the trochlear groove with its inferior pole 20-30 mm above the
distal femur and a patellofemoral gap of cartilage thickness, then the shank flexes about a
circle fitted to the posterior condyles and the patella follows by a fraction of the angle.
Shapes: a training subject exactly, or a new shape from a PCA of the training subjects (our own
mean and modes), then overall size, a smooth non-rigid warp per bone, side, pose; soft tissue
and bone intensities come from `phantom.fill_ct`.
"""
from __future__ import annotations

import functools
import os
import pickle
from dataclasses import asdict, dataclass

import numpy as np

from ..core.errors import KneeReconError
from ..core.labels import BY_NAME
from .phantom import LEG_MARGIN_MM, Phantom, _ellipse2d, _largest_components, _rot, ct_side_voxels, fill_ct, to_phantom

ALLOWED_SUBJECTS = tuple(range(1, 21))  # 1-based; 21-26 are for independent evaluation only
TEST_SUBJECTS = (5, 10, 15, 20)  # our own cross-subject test: never trained on
TRAIN_SUBJECTS = tuple(s for s in ALLOWED_SUBJECTS if s not in TEST_SUBJECTS)

# node ranges of the knee bones in the model's 3225-node vector
_NODES = {"femur": (1946, 2580), "patella": (2580, 2654), "tibfib": (2654, 3225)}
_MESHES = {
    "femur": ("femur_left_mean_rigid_LLP26.geof", "femur_left_quartic_flat"),
    "patella": ("patella_left_mean_rigid_LLP26.geof", "patella_11_left"),
    "tibfib": ("tibia_fibula_cubic_left_mean_rigid_LLP26.geof", "tibia_fibula_left_cubic_flat"),
}
INSTALL_HINT = ("LLP26 anatomy needs the optional packages musculoskeletal-models and gias3.fieldwork: "
                "pip install 'kneerecon[anatomy]' (or pip install -r requirements-test.txt)")


@dataclass
class LLP26Config:
    """Population of LLP26-based knees (uniform ranges unless noted)."""

    subjects: tuple[int, ...] = TRAIN_SUBJECTS  # whose shapes may be drawn (1-based, within 1-20)
    pca_p: float = 0.5  # probability of a new shape from the training subjects' PCA instead of a subject
    pca_sd: float = 1.0  # mode coefficients: normal(0, pca_sd) in units of each mode's SD, clipped at 2.5
    scale: tuple[float, float] = (0.85, 1.15)
    warp_mm: tuple[float, float] = (0.0, 2.5)  # smooth non-rigid warp amplitude per bone
    voxel_mm: float = 1.0
    fov_xy_mm: tuple[float, float] = (130.0, 175.0)
    fov_z_mm: tuple[float, float] = (180.0, 250.0)
    side: str = "random"
    flexion_deg: tuple[float, float] = (0.0, 40.0)
    patella_follow: tuple[float, float] = (0.55, 0.8)
    joint_gap_mm: tuple[float, float] = (3.0, 6.0)  # tibiofemoral bone gap (cartilage, menisci)
    pf_gap_mm: tuple[float, float] = (4.0, 7.0)  # patellofemoral bone gap (cartilage)
    patella_height_mm: tuple[float, float] = (20.0, 30.0)  # inferior pole above the distal femur, in extension
    rotation_deg: tuple[float, float, float] = (4.0, 4.0, 8.0)
    translation_mm: tuple[float, float, float] = (8.0, 8.0, 15.0)
    girth: tuple[float, float] = (0.85, 1.25)
    fat_mm: tuple[float, float] = (3.0, 16.0)
    cortical_hu: tuple[float, float] = (1100.0, 1800.0)
    cancellous_hu: tuple[float, float] = (180.0, 420.0)

    def to_dict(self) -> dict:
        return asdict(self)


def check_subjects(subjects) -> tuple[int, ...]:
    """The subject ids, refused unless all are within 1-20 (21-26 are held out for evaluation)."""
    subjects = tuple(int(s) for s in subjects)
    bad = [s for s in subjects if s not in ALLOWED_SUBJECTS]
    if bad or not subjects:
        raise KneeReconError(f"LLP26 subjects {bad or 'none'} not allowed: only subjects 1-20 may be used "
                             "(21-26 are kept for independent evaluation)")
    return subjects


# ----------------------------------------------------------------------------- the shape model
def _package_dir() -> str:
    try:
        import musculoskeletal.models as mm
    except ImportError:
        raise KneeReconError(INSTALL_HINT) from None
    return os.path.dirname(os.path.abspath(mm.__file__))


@functools.lru_cache(maxsize=1)
def _subject_table() -> np.ndarray:
    """Knee-bone node coordinates of subjects 1-20: [20, 3, n_nodes] (read-only, cached)."""
    with open(os.path.join(_package_dir(), "shape_models", "LLP26_rigid.pc"), "rb") as f:
        pc = pickle.load(f, encoding="latin1")
    weights = np.asarray(pc["projectedWeights"])[:, : len(ALLOWED_SUBJECTS)]  # columns 21-26 never read
    full = np.asarray(pc["mean"])[:, None] + np.asarray(pc["modes"]) @ weights  # [9675, 20]
    a, b = _NODES["femur"][0], _NODES["tibfib"][1]
    nodes = full.T.reshape(len(ALLOWED_SUBJECTS), 3, -1)[:, :, a:b]
    nodes.setflags(write=False)
    return nodes


def subject_nodes(subject: int) -> np.ndarray:
    """[3, n] knee-bone nodes of one allowed subject (1-based)."""
    check_subjects([subject])
    return _subject_table()[subject - 1].copy()


@functools.lru_cache(maxsize=4)
def training_pca(subjects: tuple[int, ...] = TRAIN_SUBJECTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [3n], modes [3n, k], sd [k]) of the given subjects' nodes: our own statistics,
    never the package's (its mean and modes include the held-out people)."""
    subjects = check_subjects(subjects)
    X = np.stack([_subject_table()[s - 1].ravel() for s in subjects])  # [m, 3n]
    mean = X.mean(0)
    u, sv, vt = np.linalg.svd(X - mean, full_matrices=False)
    k = max(1, len(subjects) - 1)
    return mean, vt[:k].T, sv[:k] / np.sqrt(max(1, len(subjects) - 1))


@functools.lru_cache(maxsize=1)
def _fields():
    """gias3 geometric fields of the three meshes (topology only; their own mean coordinates are
    replaced before every use)."""
    import scipy

    # gias3.fieldwork 3.0.1 still calls numpy functions through scipy's old aliases
    for name in ("sin", "cos", "linspace", "pi", "mod", "array", "hstack", "newaxis", "add", "sum", "sqrt",
                 "multiply", "dot"):
        try:
            getattr(scipy, name)
        except AttributeError:
            setattr(scipy, name, getattr(np, name))
    try:
        from gias3.fieldwork.field import geometric_field
    except ImportError:
        raise KneeReconError(INSTALL_HINT) from None
    d = os.path.join(_package_dir(), "atlas_meshes")
    return {k: geometric_field.load_geometric_field(os.path.join(d, g), os.path.join(d, m + ".ens"),
                                                    os.path.join(d, m + ".mesh"))
            for k, (g, m) in _MESHES.items()}


def _polydata(v: np.ndarray, t: np.ndarray):
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray

    pts = vtk.vtkPoints()
    pts.SetData(numpy_to_vtk(np.ascontiguousarray(v, dtype=np.float64), deep=True))
    cells = vtk.vtkCellArray()
    conn = np.hstack([np.full((len(t), 1), 3), np.asarray(t)]).astype(np.int64).ravel()
    cells.ImportLegacyFormat(numpy_to_vtkIdTypeArray(conn, deep=True))
    pd = vtk.vtkPolyData()
    pd.SetPoints(pts)
    pd.SetPolys(cells)
    clean = vtk.vtkCleanPolyData()  # elements share edges: merge their duplicated vertices
    clean.SetInputData(pd)
    clean.SetTolerance(1e-6)
    clean.Update()
    return clean.GetOutput()


def _arrays(pd) -> tuple[np.ndarray, np.ndarray]:
    from vtk.util.numpy_support import vtk_to_numpy

    v = vtk_to_numpy(pd.GetPoints().GetData()).astype(np.float64)
    t = vtk_to_numpy(pd.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return v, t


def bone_meshes(nodes: np.ndarray, density: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Closed triangle meshes {femur, patella, tibia, fibula: (vertices [n, 3] mm, triangles)} of
    one set of knee-bone nodes, in the model's frame (left leg, LPS)."""
    import vtk

    fields = _fields()
    out = {}
    a0 = _NODES["femur"][0]
    for name, (a, b) in _NODES.items():
        gf = fields[name]
        gf.set_field_parameters(np.ascontiguousarray(nodes[:, a - a0:b - a0, None]))
        pd = _polydata(*gf.triangulate([density, density]))
        if name != "tibfib":
            out[name] = _arrays(pd)
            continue
        conn = vtk.vtkPolyDataConnectivityFilter()  # tibia and fibula: two closed components
        conn.SetInputData(pd)
        conn.SetExtractionModeToSpecifiedRegions()
        parts = []
        for region in range(2):
            conn.InitializeSpecifiedRegionList()
            conn.AddSpecifiedRegion(region)
            conn.Update()
            clean = vtk.vtkCleanPolyData()
            clean.SetInputData(conn.GetOutput())
            clean.Update()
            mp = vtk.vtkMassProperties()
            mp.SetInputData(clean.GetOutput())
            mp.Update()
            parts.append((mp.GetVolume(), _arrays(clean.GetOutput())))
        parts.sort(key=lambda p: -p[0])
        out["tibia"], out["fibula"] = parts[0][1], parts[1][1]
    return out


# ----------------------------------------------------------------------------- assembling a knee
def _distance_to(v: np.ndarray, t: np.ndarray):
    """Signed distance (mm, negative inside) to a closed mesh, as a function of points [n, 3]."""
    import vtk

    imp = vtk.vtkImplicitPolyDataDistance()
    imp.SetInput(_polydata(v, t))

    def f(points: np.ndarray) -> np.ndarray:
        return np.array([imp.EvaluateFunction(p) for p in points])
    return f


def _slide_to_gap(points: np.ndarray, direction: np.ndarray, dist_fn, gap: float) -> float:
    """The offset s along `direction` (unit, away from the other bone) at which the smallest
    distance of `points` + s * direction to the other bone is `gap` (bisection)."""
    lo, hi = -80.0, 80.0
    for _ in range(32):
        mid = 0.5 * (lo + hi)
        if dist_fn(points + mid * direction).min() < gap:
            lo = mid
        else:
            hi = mid
    return hi


def _condylar_axis(femur: np.ndarray) -> tuple[float, float, float]:
    """(y, z, radius) of a circle fitted (least squares) to the posterior condyles in the sagittal
    plane: the flexion axis runs along x through it."""
    zmin = femur[:, 2].min()
    dist = femur[femur[:, 2] < zmin + 35.0]
    pts = dist[dist[:, 1] > np.median(dist[:, 1])]  # posterior half (+y)
    y, z = pts[:, 1], pts[:, 2]
    A = np.stack([y, z, np.ones_like(y)], 1)
    c, *_ = np.linalg.lstsq(A, y * y + z * z, rcond=None)
    yc, zc = c[0] / 2, c[1] / 2
    r = float(np.sqrt(max(c[2] + yc * yc + zc * zc, 0.0)))
    if not 12.0 < r < 40.0:  # degenerate fit: a typical condyle instead
        r = 22.0
        yc, zc = float(pts[:, 1].max() - r), float(zmin + r)
    return float(yc), float(zc), r


def _rotate_x(points: np.ndarray, yc: float, zc: float, angle_deg: float) -> np.ndarray:
    """Rotation about the x-parallel axis through (yc, zc); positive flexion moves points below
    the axis posteriorly (+y)."""
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    out = points.copy()
    y, z = points[:, 1] - yc, points[:, 2] - zc
    out[:, 1] = c * y - s * z + yc
    out[:, 2] = s * y + c * z + zc
    return out


def _warp_points(v: np.ndarray, rng: np.random.Generator, amplitude: float, n: int = 4) -> np.ndarray:
    """Smooth random displacement: a few sinusoids of 50-140 mm wavelength."""
    out = v.copy()
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / rng.uniform(50, 140) / np.linalg.norm(k)
        d = rng.normal(size=3)
        d *= amplitude / np.sqrt(n) / np.linalg.norm(d)
        out += np.sin(v @ k + rng.uniform(0, 2 * np.pi))[:, None] * d[None, :]
    return out


def sample_parameters(seed: int, config: LLP26Config) -> dict:
    """One knee's parameters; deterministic per seed."""
    subjects = check_subjects(config.subjects)
    rng = np.random.default_rng([seed, 26])
    side = config.side if config.side in ("left", "right") else ("left" if rng.random() < 0.5 else "right")
    pca = rng.random() < config.pca_p
    n_modes = len(training_pca()[2])
    coeffs = np.clip(rng.normal(0.0, config.pca_sd, n_modes), -2.5, 2.5) if pca else None
    flex = float(rng.uniform(*config.flexion_deg))
    return {
        "seed": int(seed),
        "source": "llp26",
        "side": side,
        "subject": None if pca else int(subjects[int(rng.integers(len(subjects)))]),
        "pca_coefficients": None if coeffs is None else [float(c) for c in coeffs],
        "scale": float(rng.uniform(*config.scale)),
        "warp_mm": [float(rng.uniform(*config.warp_mm)) for _ in range(4)],
        "warp_seed": int(rng.integers(2**31)),
        "flexion_deg": flex,
        "patella_rotation_deg": flex * float(rng.uniform(*config.patella_follow)),
        "joint_gap_mm": float(rng.uniform(*config.joint_gap_mm)),
        "pf_gap_mm": float(rng.uniform(*config.pf_gap_mm)),
        "patella_height_mm": float(rng.uniform(*config.patella_height_mm)),
        "fov_xy_mm": float(rng.uniform(*config.fov_xy_mm)),
        "fov_z_mm": float(rng.uniform(*config.fov_z_mm)),
        "rotation_deg": [float(rng.uniform(-r, r)) for r in config.rotation_deg],
        "translation_mm": [float(rng.uniform(-t, t)) for t in config.translation_mm],
        "girth": float(rng.uniform(*config.girth)),
        "soft_anterior_mm": float(rng.uniform(5.0, 14.0)),
        "fat_mm": float(rng.uniform(*config.fat_mm)),
        "cortical_hu": float(rng.uniform(*config.cortical_hu)),
        "cancellous_hu": float(rng.uniform(*config.cancellous_hu)),
        "texture_seed": int(rng.integers(2**31)),
    }


def assemble_knee(meshes: dict, p: dict) -> dict[str, np.ndarray]:
    """Vertices of each bone placed as a knee (joint gaps, patella in the groove, flexion), in a
    right-knee-canonical or left knee frame per p['side'], centred on the joint line, then posed
    (rotation and translation) into the world frame. Triangles are unchanged."""
    fem = meshes["femur"][0]
    tib, fib, pat = (meshes[k][0].copy() for k in ("tibia", "fibula", "patella"))
    fem_dist = _distance_to(*meshes["femur"])
    up = np.array([0.0, 0.0, 1.0])

    # tibia and fibula together, along the long axis, to the tibiofemoral gap
    top = tib[:, 2] > tib[:, 2].max() - 40.0
    s = _slide_to_gap(tib[top], -up, fem_dist, p["joint_gap_mm"])
    tib -= s * up
    fib -= s * up
    # patella: inferior pole above the distal femur, then back onto the trochlea
    zmin = fem[:, 2].min()
    pat[:, 2] += zmin + p["patella_height_mm"] - pat[:, 2].min()
    pat -= _slide_to_gap(pat, np.array([0.0, -1.0, 0.0]), fem_dist, p["pf_gap_mm"]) * np.array([0.0, -1.0, 0.0])

    # flexion about the condylar axis; each bone re-seated at its gap along its own direction
    yc, zc, _ = _condylar_axis(fem)
    if p["flexion_deg"] > 0:
        tib, fib = (_rotate_x(v, yc, zc, p["flexion_deg"]) for v in (tib, fib))
        axis = _rotate_x(np.array([[0.0, yc, zc + 1.0]]), yc, zc, p["flexion_deg"])[0] - np.array([0.0, yc, zc])
        top = tib[:, 2] > np.percentile(tib[:, 2], 85)
        s = _slide_to_gap(tib[top], -axis, fem_dist, p["joint_gap_mm"])
        tib -= s * axis
        fib -= s * axis
    if p["patella_rotation_deg"] > 0:
        pat = _rotate_x(pat, yc, zc, p["patella_rotation_deg"])
    radial = pat.mean(0) - np.array([pat.mean(0)[0], yc, zc])
    radial /= np.linalg.norm(radial)
    pat += _slide_to_gap(pat, radial, fem_dist, p["pf_gap_mm"]) * radial

    # knee frame: origin on the joint line below the condyles' centre
    distal = fem[fem[:, 2] < zmin + 30.0]
    centre = np.array([distal[:, 0].mean(), distal[:, 1].mean(), zmin - 0.5 * p["joint_gap_mm"]])
    R = _rot(*np.radians(p["rotation_deg"]))
    t = np.asarray(p["translation_mm"], float)
    out = {}
    for name, v in (("femur", fem), ("patella", pat), ("tibia", tib), ("fibula", fib)):
        k = (v - centre) * p["scale"]
        if p["side"] == "right":  # the model is a left leg: mirror for a right one
            k[:, 0] = -k[:, 0]
        out[name] = k @ R.T + t
    return out


def _voxelize(v: np.ndarray, t: np.ndarray, origin, shape_zyx, vox: float) -> np.ndarray:
    """Inside mask [nz, ny, nx] of a closed mesh on an axis-aligned grid."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    pd = _polydata(v, t)
    st = vtk.vtkPolyDataToImageStencil()
    st.SetInputData(pd)
    st.SetOutputOrigin(*origin)
    st.SetOutputSpacing(vox, vox, vox)
    st.SetOutputWholeExtent(0, shape_zyx[2] - 1, 0, shape_zyx[1] - 1, 0, shape_zyx[0] - 1)
    st.Update()
    img = vtk.vtkImageStencilToImage()
    img.SetInputConnection(st.GetOutputPort())
    img.SetInsideValue(1)
    img.SetOutsideValue(0)
    img.SetOutputScalarTypeToUnsignedChar()
    img.Update()
    return vtk_to_numpy(img.GetOutput().GetPointData().GetScalars()).reshape(shape_zyx).astype(bool)


def _shape_nodes(p: dict, shape: str) -> np.ndarray:
    if shape == "mean":  # the training mean shape (mean-shape baseline)
        mean, _, _ = training_pca()
        return mean.reshape(3, -1)
    if p["subject"] is not None:
        return subject_nodes(p["subject"])
    mean, modes, sd = training_pca()
    return (mean + modes @ (np.asarray(p["pca_coefficients"]) * sd)).reshape(3, -1)


def generate_llp26_phantom(seed: int, config: LLP26Config | None = None, shape: str = "sample") -> Phantom:
    """One labelled knee CT from LLP26 bone surfaces; identical output for identical (seed, config).
    `shape="mean"` builds the training mean shape at exactly the pose of the sampled knee (size,
    side, flexion, gaps, rotation, translation) and without the warp: the mean-shape baseline."""
    config = config or LLP26Config()
    if shape not in ("sample", "mean"):
        raise ValueError(f"shape must be 'sample' or 'mean', got {shape!r}")
    p = sample_parameters(seed, config)
    meshes = bone_meshes(_shape_nodes(p, shape))
    if shape == "sample":
        wrng = np.random.default_rng(p["warp_seed"])
        for (name, (v, t)), amp in zip(list(meshes.items()), p["warp_mm"]):
            meshes[name] = (_warp_points(v, wrng, amp) if amp > 0 else v, t)
    placed = assemble_knee(meshes, p)

    vox = float(config.voxel_mm)
    nxy, nz = int(round(p["fov_xy_mm"] / vox)), int(round(p["fov_z_mm"] / vox))
    shape_zyx = (nz, nxy, nxy)
    origin = (-(nxy - 1) / 2 * vox, -(nxy - 1) / 2 * vox, -(nz - 1) / 2 * vox)
    labels = np.zeros(shape_zyx, np.uint8)
    masks = {n: _voxelize(placed[n], meshes[n][1], origin, shape_zyx, vox) for n in placed}
    # femur first; the others only where no bone already is, so bones never overlap
    for name in ("femur", "tibia", "fibula", "patella"):
        labels[masks[name] & (labels == 0)] = BY_NAME[name].value
    labels = _largest_components(labels)

    # soft tissue: an elliptic leg per slice around the bones, its front a little ahead of the
    # most anterior bone (patella, tibial tuberosity), smoothed along z
    from scipy.ndimage import gaussian_filter1d

    ax_xy = origin[0] + np.arange(nxy) * vox
    ax_z = origin[2] + np.arange(nz) * vox
    bone = labels > 0
    any_row = bone.any(axis=2)  # [nz, ny]
    has = any_row.any(1)
    y_front = np.where(has, ax_xy[np.argmax(any_row, axis=1)], np.nan)
    cnt = bone.sum(axis=(1, 2))
    x_mid = np.where(has, (bone.sum(1) * ax_xy[None, :]).sum(1) / np.maximum(cnt, 1), np.nan)
    idx = np.arange(nz)
    y_front = np.interp(idx, idx[has], y_front[has]) if has.any() else np.zeros(nz)
    x_mid = np.interp(idx, idx[has], x_mid[has]) if has.any() else np.zeros(nz)
    y_front = gaussian_filter1d(y_front, 15.0 / vox, mode="nearest")
    x_mid = gaussian_filter1d(x_mid, 15.0 / vox, mode="nearest")
    g = p["girth"]
    depth = 120.0 * g
    rx = 58.0 * g
    ant = y_front - p["soft_anterior_mm"] * g
    # the CT holds the whole leg (rays cross all of it); the radiograph field stays the drawn one
    reach = max(np.abs(x_mid).max() + rx, np.abs(ant).max(), np.abs(ant + depth).max())
    n_ct = ct_side_voxels(p["fov_xy_mm"], 2 * (reach + LEG_MARGIN_MM), vox)
    if n_ct > nxy:
        m = (n_ct - nxy) // 2
        labels = np.pad(labels, ((0, 0), (m, m), (m, m)))
        nxy, shape_zyx = n_ct, (nz, n_ct, n_ct)
        origin = (origin[0] - m * vox, origin[1] - m * vox, origin[2])
        ax_xy = origin[0] + np.arange(nxy) * vox
    p["ct_fov_xy_mm"] = nxy * vox
    cy = (ant + depth / 2.0)[:, None, None]
    d_leg = _ellipse2d(ax_xy[None, None, :] - x_mid[:, None, None], ax_xy[None, :, None] - cy, rx, depth / 2.0)
    d_leg = np.broadcast_to(d_leg, shape_zyx)
    ct = fill_ct(labels, d_leg, ax_z[:, None, None] - p["translation_mm"][2], p["scale"], p, vox)
    params = {**p, "shape": shape, "volumes_ml": {n: float((labels == BY_NAME[n].value).sum() * vox**3 / 1000)
                                                  for n in placed}}
    return to_phantom(ct, labels, origin, vox, params)
