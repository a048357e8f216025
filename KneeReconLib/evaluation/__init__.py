"""Scores: Dice and surface metrics, and the 3D and 2D evaluation of a model."""
