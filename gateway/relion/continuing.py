"""What the gateway passes to relion_refine when it continues a run (``--continue``)."""
from __future__ import annotations

from collections.abc import Mapping

from gateway.relion.flags import FlagValue, NormalisedFlags

# The request options passed again when the gateway continues a run (relion_refine --continue
# <run_itNNN_optimiser.star>). In continue mode RELION 3.1 reads everything else from the optimiser
# file and warns "is not a valid RELION argument" for most options (measured: --K, --ctf, --angpix,
# --random_seed, --zero_mask, --ref, --sym, --ini_high, ...), which the job script turns into a
# failure. It does read some sampling options (--healpix_order, --offset_range, --psi_step,
# --sigma_ang, ...) but as *new* values, which would reset what auto-refine had refined since, so
# those are never passed again. What is left is how to compute and how long to run: the same
# resources (the continued job may run on other nodes or GPUs) and the same iteration limits.
CONTINUE_OPTIONS: frozenset[str] = frozenset(
    {
        "iter",
        "auto_iter_max",
        "j",
        "pool",
        "gpu",
        "dont_combine_weights_via_disc",
        "preread_images",
        "no_parallel_disc_io",
        "onthefly_shifts",
        "pad",
        "skip_gridding",
    }
)


def continue_arguments(options: Mapping[str, FlagValue], optimiser_star: str, output_prefix: str) -> list[str]:
    """relion_refine's arguments to continue a run from ``optimiser_star`` into the same --o."""
    kept = NormalisedFlags({key: value for key, value in options.items() if key in CONTINUE_OPTIONS})
    return ["--continue", optimiser_star, "--o", output_prefix, *kept.argv()]
