"""Frames and projection: CT frames, back-projection of the two views into the grid, the height-offset
alignment and the n-d image filters they use. No networks."""
