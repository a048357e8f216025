"""KneeRecon: 3D knee bones (femur, patella, tibia, fibula) from an AP and a lateral X-ray.

Research tool, not a medical device. Heavy modules (torch, VTK) are imported on use. The stage
packages below and the order in which they may import each other: docs/architecture.md."""

from .core.errors import KneeReconError

__version__ = "0.7.0"


def reconstruct(*args, **kwargs):
    """See `KneeReconLib.reconstruction.inference.reconstruct`."""
    from .reconstruction.inference import reconstruct as _r

    return _r(*args, **kwargs)


def __getattr__(name: str):
    # Reconstruction on first use: importing it pulls in numpy, SimpleITK and VTK
    if name == "Reconstruction":
        from .reconstruction.inference import Reconstruction

        return Reconstruction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["reconstruct", "Reconstruction", "KneeReconError", "__version__"]
