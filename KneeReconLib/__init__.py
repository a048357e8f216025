"""KneeRecon: 3D knee bones (femur, patella, tibia, fibula) from an AP and a lateral X-ray.

Research tool, not a medical device. Heavy modules (torch, VTK) are imported on use."""

__version__ = "0.4.0"


def reconstruct(*args, **kwargs):
    """See `KneeReconLib.inference.reconstruct`."""
    from .inference import reconstruct as _r

    return _r(*args, **kwargs)


__all__ = ["reconstruct", "__version__"]
