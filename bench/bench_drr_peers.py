"""Cone-beam DRR speed against DiffDRR and nanodrr (issue 8), side by side in one run: the same
256^3 volume, a 256x256 detector (1.2 mm pixels, SID 1100 mm, source 900 mm from the isocentre),
an AP + lateral pair, the same number of samples per ray, on the CPU (or --device cuda).

DiffDRR and nanodrr are benchmark-only dependencies; install them in a separate environment,
without their optional heavy requirements, e.g.:
    python -m venv /tmp/bench && /tmp/bench/bin/pip install torch==2.13.0 numpy scipy SimpleITK pandas \\
        roma einops fastcore jaxtyping platformdirs deprecated humanize nibabel rich typer tqdm
    /tmp/bench/bin/pip install --no-deps diffdrr==0.6.1 nanodrr==0.1.7 torchio
    /tmp/bench/bin/python bench/bench_drr_peers.py
Each renderer's own sampling: DiffDRR's "trilinear" renderer with n_points and nanodrr's "torch"
backend with n_samples, both over each ray's stretch inside the volume; KneeRecon's default
projector (`project_cone_planes`, Joseph's method) samples each ray once per CT plane, i.e. 256
samples per ray for this 256^3 volume, so it is compared with the peers at 256 samples; its ray
marcher (`project_cone`) is shown at each sample count too. Prints median wall-clock times and
KneeRecon's speed-up over each."""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.core.geometry import ReconGrid, ViewGeometry  # noqa: E402
from KneeReconLib.data.drr import project_cone, project_cone_planes  # noqa: E402

N, DET, PIX, SID, SOD = 256, 256, 1.2, 1100.0, 900.0
VOX = 200.0 / N


def med(fn, device, n=3):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    fn()
    sync()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def volume(device):
    """A smooth random attenuation volume (a cylinder with inclusions), mu in 1/mm."""
    g = torch.Generator().manual_seed(0)
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, N),) * 3, indexing="ij")
    vol = 0.02 * ((x ** 2 + y ** 2) < 0.6).float() + 0.01 * torch.rand(N, N, N, generator=g)
    return vol.to(device)


GRID = ReconGrid.centered((N * VOX,) * 3, (N,) * 3)
VIEWS = [ViewGeometry("ap", DET, DET, (PIX, PIX), SID, SOD), ViewGeometry("lateral", DET, DET, (PIX, PIX), SID, SOD)]


def ours_raymarch(vol, n_samples):
    return lambda: [project_cone(vol[None], GRID, v, n_samples) for v in VIEWS]


def ours_planes(vol):
    return lambda: [project_cone_planes(vol[None], GRID, v) for v in VIEWS]


def nanodrr_fn(vol, n_samples, device):
    from nanodrr.camera import make_k_inv  # noqa: F401
    from nanodrr.camera.extrinsics import make_rt_inv
    from nanodrr.data import Subject
    from nanodrr.drr import DRR

    affine = torch.diag(torch.tensor([VOX, VOX, VOX, 1.0]))
    affine[:3, 3] = -VOX * (N - 1) / 2
    image = vol[None, None].float()  # already mu: no HU conversion
    subject = Subject(image, torch.zeros_like(image), affine, torch.linalg.inv(affine),
                      Subject._make_voxel_to_grid(image.shape), torch.zeros(3), max_label=0,
                      convert_to_mu=False).to(device)
    drr = DRR.from_carm_intrinsics(SID, PIX, PIX, 0.0, 0.0, DET, DET, device=device, dtype=torch.float32)
    rot = torch.tensor([[0.0, 0.0, 0.0], [90.0, 0.0, 0.0]], device=device)
    trans = torch.tensor([[0.0, SOD, 0.0], [0.0, SOD, 0.0]], device=device)
    rt_inv = make_rt_inv(rot, trans, "AP", torch.zeros(3, device=device))
    return lambda: drr(subject, rt_inv, n_samples=n_samples, backend="torch")


def diffdrr_fn(vol, n_samples, device):
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from torchio import ScalarImage

    affine = np.diag([VOX, VOX, VOX, 1.0])
    subject = read(ScalarImage(tensor=vol.cpu()[None].permute(0, 3, 2, 1).contiguous(), affine=affine))
    drr = DRR(subject, sdd=SID, height=DET, delx=PIX, renderer="trilinear").to(device)
    rot = torch.tensor([[0.0, 0.0, 0.0], [torch.pi / 2, 0.0, 0.0]], device=device)
    trans = torch.tensor([[0.0, SOD, 0.0], [0.0, SOD, 0.0]], device=device)
    return lambda: drr(rot, trans, parameterization="euler_angles", convention="ZXY", n_points=n_samples)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, nargs="*", default=[128, 256])
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}; volume {N}^3, "
          f"detector {DET}^2, AP + lateral pair")
    vol = volume(a.device)
    planes = med(ours_planes(vol), a.device)
    print(f"KneeRecon project_cone_planes (default, {N} samples/ray = one per plane): {planes * 1000:.0f} ms")
    for n in a.samples:
        res = {"KneeRecon project_cone (ray marching)": med(ours_raymarch(vol, n), a.device)}
        for name, make in (("nanodrr (torch backend)", nanodrr_fn), ("DiffDRR (trilinear)", diffdrr_fn)):
            try:
                res[name] = med(make(vol, n, a.device), a.device)
            except Exception as e:  # a peer missing from this environment is reported, not fatal
                print(f"  {name}: not run ({type(e).__name__}: {str(e)[:120]})")
        for name, t in res.items():
            ratio = f"   planes projector's speed-up x{t / planes:.2f}" if n == N else ""
            print(f"{n:4d} samples/ray  {name:38s} {t * 1000:8.0f} ms{ratio}")


if __name__ == "__main__":
    main()
