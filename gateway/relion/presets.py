"""Fast relion_refine settings for the tiny synthetic dataset (box 32, 200 particles).

Measured in shared/notes/relion.md: about 5-8 s (2D), 6-10 s (3D, healpix 1) and 14-20 s
(auto-refine, healpix 1, converges in 4 iterations) with 3 ranks on 2 cores. Used by the demo,
the integration tests and the benchmarks.
"""
from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "i": "particles.star",
    "particle_diameter": 100,
    "ctf": True,
    "zero_mask": True,
    "flatten_solvent": True,
    "offset_range": 4,
    "offset_step": 2,
    "norm": True,
    "scale": True,
    "j": 1,
    "pool": 10,
    "dont_combine_weights_via_disc": True,
    "preread_images": True,
    "random_seed": 1,
}

TINY_FLAGS: dict[str, dict[str, Any]] = {
    "2d": {**_COMMON, "o": "Class2D/run", "K": 3, "iter": 2, "tau2_fudge": 2, "psi_step": 10},
    "3d": {
        **_COMMON,
        "o": "Class3D/run",
        "ref": "ref.mrc",
        "firstiter_cc": True,
        "ini_high": 30,
        "K": 2,
        "iter": 2,
        "tau2_fudge": 4,
        "sym": "C1",
        "healpix_order": 1,
    },
    "autorefine": {
        **_COMMON,
        "o": "Refine3D/run",
        "ref": "ref.mrc",
        "firstiter_cc": True,
        "ini_high": 30,
        "low_resol_join_halves": 40,
        "sym": "C1",
        "healpix_order": 1,
        "auto_local_healpix_order": 4,
        "auto_ignore_angles": True,
        "auto_resol_angles": True,
    },
}
