"""Every number the command line takes, checked before any work is done: finite, of the right
kind, inside a range that makes physical or practical sense. A bad value ends the command with
one line and exit code 2, never a traceback (argparse's `type=float` happily accepts "nan" and
"inf", and a NaN pixel spacing used to surface as a numpy error deep inside the reconstruction).

The limits live in one table keyed by argparse's `dest`, so the parser itself stays as it was;
`Testing/test_validation.py` checks that every numeric option of every command has an entry.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from ..core.errors import KneeReconError


@dataclass(frozen=True)
class Limit:
    """An allowed range for one option: lo <= value <= hi (lo excluded when `lo_open`), an
    integer when `integer`, a multiple of `multiple_of` when set; `unit` goes into messages."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False
    multiple_of: int | None = None
    unit: str = ""

    def check(self, name: str, value) -> float | int:
        """The value if it is allowed, else KneeReconError naming the option and the range."""
        unit = f" {self.unit}" if self.unit else ""
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise KneeReconError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(v):
            raise KneeReconError(f"{name} must be a finite number, got {value!r}")
        if self.integer and v != int(v):
            raise KneeReconError(f"{name} must be a whole number, got {value!r}")
        low_bad = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high_bad = self.hi is not None and v > self.hi
        if low_bad or high_bad:
            lo = "" if self.lo is None else (f"more than {self.lo:g}" if self.lo_open else f"at least {self.lo:g}")
            hi = "" if self.hi is None else f"at most {self.hi:g}"
            raise KneeReconError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}{unit}, got {value!r}")
        if self.multiple_of and int(v) % self.multiple_of:
            raise KneeReconError(f"{name} must be a multiple of {self.multiple_of}, got {value!r}")
        return int(v) if self.integer else v


PROBABILITY = Limit(0.0, 1.0)
COUNT = Limit(0, 10_000_000, integer=True)
POSITIVE_COUNT = Limit(1, 100_000_000, integer=True)
# (0, 10] mm covers every detector (0.05-0.2 mm) and downsampled exports; read_xray refuses more
PIXEL_MM = Limit(0.0, 10.0, lo_open=True, unit="mm")
DISTANCE_MM = Limit(0.0, 5000.0, lo_open=True, unit="mm")  # SID/SOD: knee 1000-1300, long-leg 3000
HEIGHT_OFFSET_MM = Limit(-50.0, 50.0, unit="mm")  # more than 5 cm is a different picture, not patient motion

# argparse dest -> limit; the same dest means the same thing in every command
LIMITS: dict[str, Limit] = {
    "pixel_spacing": PIXEL_MM,
    "sid": DISTANCE_MM,
    "sod": DISTANCE_MM,
    "voxel": Limit(0.25, 5.0, unit="mm"),
    "grid_size": Limit(16, 512, integer=True, multiple_of=16),
    "workers": Limit(0, 256, integer=True),  # train: data-loader processes, 0 = in the main process
    "threads": Limit(0, 1024, integer=True),
    "count": COUNT,
    "calibration_count": Limit(1, 10_000, integer=True),
    "seed": Limit(0, 2**32 - 1, integer=True),
    "collimate_p": PROBABILITY,
    "steps": POSITIVE_COUNT,
    "batch_size": Limit(1, 4096, integer=True),
    "lr": Limit(0.0, 10.0, lo_open=True),
    "crop": Limit(0, 4096, integer=True),
    "crop_z": Limit(0, 4096, integer=True),
    "slab_p": PROBABILITY,
    "slab_depth": Limit(1, 4096, integer=True),
    "realism_p": PROBABILITY,
    "ema": Limit(0.0, 0.999999),
    "ngcc_lambda": Limit(0.0, 1000.0),
    "dice_weight": Limit(0.0, 1000.0),
    "warmup": COUNT,
    "val_every": POSITIVE_COUNT,
    "ckpt_every": POSITIVE_COUNT,
    "stop_at": POSITIVE_COUNT,
    "log_every": POSITIVE_COUNT,
    "phantoms": COUNT,
    "fit_iterations": POSITIVE_COUNT,
    "cases": POSITIVE_COUNT,
    "modes": Limit(1, 10_000, integer=True),
    "spacing": Limit(0.0, 20.0, lo_open=True, unit="mm"),
    "pixel_mm": PIXEL_MM,
    "base": Limit(1, 4096, integer=True),
    "res_blocks": Limit(0, 256, integer=True),
    "refine": Limit(1, 3, integer=True),
}
# where one command means something else by a dest: (command, dest) -> limit
COMMAND_LIMITS: dict[tuple[str, str], Limit] = {
    ("reconstruct-batch", "workers"): Limit(1, 256, integer=True),  # parallel reconstructions
}
# options given as text that may hold a number
WORDS_OR_NUMBER: dict[str, tuple[tuple[str, ...], Limit]] = {
    "height_offset": (("auto", "none"), HEIGHT_OFFSET_MM),
}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate_args(args: argparse.Namespace) -> None:
    """Check every numeric option in `args` against LIMITS (KneeReconError on the first bad one);
    any other float must at least be finite. Options left unset (None) are not checked."""
    for dest, value in vars(args).items():
        if value is None or isinstance(value, bool) or callable(value):
            continue
        if dest in WORDS_OR_NUMBER:
            words, limit = WORDS_OR_NUMBER[dest]
            if str(value) not in words:
                try:
                    limit.check(flag(dest), value)
                except KneeReconError as e:
                    raise KneeReconError(f"{e} (or one of: {', '.join(words)})")
        elif (dest in LIMITS or (getattr(args, "command", None), dest) in COMMAND_LIMITS) and \
                not isinstance(value, (int, float)):
            # argparse turns "--sid=--" into an empty list instead of refusing it
            raise KneeReconError(f"{flag(dest)} must be a number, got {value!r}")
        elif (getattr(args, "command", None), dest) in COMMAND_LIMITS and isinstance(value, (int, float)):
            COMMAND_LIMITS[(args.command, dest)].check(flag(dest), value)
        elif dest in LIMITS and isinstance(value, (int, float)):
            LIMITS[dest].check(flag(dest), value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise KneeReconError(f"{flag(dest)} must be a finite number, got {value!r}")


def optional_number(text: str | None, name: str, limit: Limit) -> float | None:
    """A number from a manifest cell or similar text (None when empty), checked against `limit`."""
    if text is None or str(text).strip() == "":
        return None
    return limit.check(name, str(text).strip())


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2), like every other
    KneeRecon error, instead of the usage block followed by the message."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
