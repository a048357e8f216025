"""The paper's comparison systems: shape models, 2D/3D shape-model registration and the side-by-side
method comparison."""
