"""Frames and projection: CT frames, back-projection of the two views into the grid, the height-offset
alignment. No networks."""
