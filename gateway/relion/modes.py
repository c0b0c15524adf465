"""The RELION job types the gateway runs: the one list every rule, schema and command line uses."""
from __future__ import annotations

MODES = ("2d", "3d", "autorefine")  # 2D classification, 3D classification, 3D auto-refinement
