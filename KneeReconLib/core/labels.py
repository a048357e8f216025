"""The label table of DESIGN.md: values, names, colours and SNOMED CT codes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bone:
    value: int
    name: str
    color: tuple[float, float, float]
    snomed: str


BONES: tuple[Bone, ...] = (
    Bone(1, "femur", (0.85, 0.25, 0.25), "71341001"),
    Bone(2, "patella", (0.30, 0.75, 0.35), "64234005"),
    Bone(3, "tibia", (0.25, 0.45, 0.85), "12611008"),
    Bone(4, "fibula", (0.90, 0.80, 0.25), "87342007"),
)
NUM_CLASSES = 5  # background + four bones
BONE_NAMES = tuple(b.name for b in BONES)
BY_NAME = {b.name: b for b in BONES}
LATERALITY_SNOMED = {"left": "7771000", "right": "24028007"}


def label_table() -> dict[str, str]:
    """{"1": "femur", ...}: the table stored in model cards and reports."""
    return {str(b.value): b.name for b in BONES}
