"""Every relion_refine option the gateway will pass, with its type, modes and RELION versions.

RELION ignores an option it does not know and still exits 0: it only prints ``WARNING: Option
--x is not a valid RELION argument`` on stderr and runs with the default. So the gateway refuses
any option RELION would not read *before* it submits a job, and names the option and the rule.

Where each version's list comes from:

- **3.1**: the output of ``relion_refine --help`` of the installed RELION 3.1.3 (Debian
  ``relion 3.1.3-3+b1``, CPU build): every option it prints, and nothing else.
  ``tests/unit/test_catalogue.py`` re-reads that help and fails if the two ever differ.
  ``relion_refine_mpi --help`` prints two more options, both for debugging
  (``--halt_all_followers_except``, ``--keep_debug_reconstruct_files``). They are refused below.
- **4.0**: the non-hidden ``parser.getOption``/``parser.checkOption`` calls in
  ``MlOptimiser::parseInitial`` of 3dem/relion ``src/ml_optimiser.cpp`` at commit
  2daa7447c1c871be062cce99109b6041955ec5e9. That is the 4.0 series: it has ``--grad``, ``--som``
  and ``--ios``, and it lacks both ``--blush`` and the ``--external_reconstruct`` continuation
  flag that 4.0.2 added. Compared with 3.1 it adds the gradient (VDAM), SOM, subtomogram and
  ``--ios`` options, ``--center_classes``, ``--auto_sampling``, ``--tau2_fudge_scheme``,
  ``--ctf_uncorrected_ref``, ``--nr_parts_sigma2noise`` and ``--dont_skip_gridding``. It drops the
  ``--sgd*`` family, ``--stochastic_em``, ``--ctf_corrected_ref`` (4.0 only warns that it was
  removed), ``--skip_gridding`` (skipping became the default) and ``--pad_ctf`` (4.0 parses it but
  stops with "--pad_ctf currently disabled").
- **5.0**: the same function in LSB-Helsinki/relion5 ``src/ml_optimiser.cpp`` at commit
  aec00fc3436da04c4043ddf1016a91d2c291c2ce, a RELION 5 fork with the 5.0 SYCL/HIP code. A
  third-party option list said to come from the 3dem ``ver5.0`` tag matches it. Compared with 4.0
  it adds ``--tomograms``, ``--trajectories``, ``--offset_range_x/y/z``, ``--blush`` and
  ``--blush_skip_spectral_trailing``, and removes nothing.

Left out on purpose: options RELION registers as hidden (``--abort_at_resolution``,
``--asymmetric_padding``, ``--skip_realspace_helical_sym``, ``--min_sigma2_offset``,
``--do_red``); debug options read with bare ``checkParameter``/``getParameter``, which RELION
itself reports as "not a valid RELION argument" (``--debug1``, ``--no_map``, ``--sigma``, ...);
``--cpu`` and the ``--sycl*`` options, which exist only in ALTCPU or SYCL builds (and the
``--sycl-cuda`` spellings cannot survive the flag normaliser's dash-to-underscore step); and the
options that only ``--continue`` reads (see GATEWAY_OWNED).
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.relion.flags import FlagError, FlagValue, check_relative_path
from gateway.relion.modes import MODES

Kind = Literal["switch", "int", "float", "string", "path"]

SUPPORTED_VERSIONS = ("3.1", "4.0", "5.0")


@dataclass(frozen=True)
class OptionSpec:
    """One relion_refine option: its value type, the modes that use it and the RELION versions that have it."""

    name: str  # underscore spelling, e.g. "particle_diameter", "K"
    kind: Kind
    modes: frozenset[str]  # subset of MODES where the option is meaningful and allowed
    since: str = "3.1"  # first RELION version that has it
    until: str | None = None  # last RELION version that has it, if it was removed
    gpu: bool = False  # needs a GPU partition
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""
    minimum_exclusive: bool = False  # True: the value must be > minimum, not >= minimum
    maximum_exclusive: bool = False  # True: the value must be < maximum, not <= maximum

    def in_version(self, relion_version: str) -> bool:
        """Whether RELION ``relion_version`` knows this option."""
        rank = _version_rank(relion_version)
        if rank < _version_rank(self.since):
            return False
        return self.until is None or rank <= _version_rank(self.until)


ALL = frozenset(MODES)
CLASSIFICATION = frozenset({"2d", "3d"})
THREE_D = frozenset({"3d", "autorefine"})
AUTOREFINE = frozenset({"autorefine"})
CLASS2D = frozenset({"2d"})
CLASS3D = frozenset({"3d"})

_S: Kind = "switch"
_I: Kind = "int"
_F: Kind = "float"
_T: Kind = "string"
_P: Kind = "path"

_SPECS: tuple[OptionSpec, ...] = (
    # --- General (3.1 --help "General options") ---
    OptionSpec("i", _P, ALL, description="Input particles STAR file"),
    OptionSpec("o", _P, ALL, description="Output rootname, e.g. Class2D/run (the directory must exist)"),
    OptionSpec("iter", _I, CLASSIFICATION, minimum=1, description="Maximum number of iterations"),
    OptionSpec("tau2_fudge", _F, ALL, minimum=0, minimum_exclusive=True,
               description="Regularisation parameter T; values above 1 give the data more weight"),
    OptionSpec("K", _I, CLASSIFICATION, minimum=1, description="Number of classes (references)"),
    OptionSpec("particle_diameter", _F, ALL, minimum=0, minimum_exclusive=True,
               description="Diameter of the circular mask applied to the images (Å)"),
    OptionSpec("zero_mask", _S, ALL, description="Set the solvent area of the particles to zero instead of noise"),
    OptionSpec("flatten_solvent", _S, ALL, description="Mask the references as well"),
    OptionSpec("solvent_mask", _P, THREE_D, description="User mask for the references"),
    OptionSpec("solvent_mask2", _P, THREE_D, description="Secondary user mask with its own average density"),
    OptionSpec("lowpass_mask", _P, THREE_D, description="Mask of a region to low-pass filter"),
    OptionSpec("lowpass", _F, THREE_D, description="Low-pass cutoff (Å) for the region in --lowpass_mask"),
    OptionSpec("tau", _P, ALL, description="STAR file with a tau2 spectrum to keep constant"),
    OptionSpec("local_symmetry", _P, THREE_D, description="Local symmetry description file (masks and operators)"),
    OptionSpec("split_random_halves", _S, AUTOREFINE, description="Refine two random halves independently (gold standard)"),
    OptionSpec("low_resol_join_halves", _F, AUTOREFINE, minimum=0, minimum_exclusive=True,
               description="Resolution (Å) up to which the two half-reconstructions are joined"),
    # --- Initialisation ---
    OptionSpec("ref", _P, THREE_D, description="Reference map, stack or STAR file"),
    OptionSpec("denovo_3dref", _S, CLASS3D, description="Make an initial 3D model from randomly oriented particles"),
    OptionSpec("offset", _F, ALL, minimum=0, minimum_exclusive=True,
               description="Initial standard deviation of the origin offsets (Å)"),
    OptionSpec("firstiter_cc", _S, THREE_D, description="Cross-correlation in the first iteration (reference not on absolute scale)"),
    OptionSpec("ini_high", _F, THREE_D, minimum=0, minimum_exclusive=True,
               description="Resolution (Å) to which the first iteration is limited"),
    # --- Orientations ---
    OptionSpec("oversampling", _I, ALL, minimum=0, description="Adaptive oversampling order (0 = none, 1 = 2x, ...)"),
    OptionSpec("healpix_order", _I, THREE_D, minimum=0, maximum=9,
               description="HEALPix order of the angular sampling (2 = 15°, 3 = 7.5°, ...)"),
    OptionSpec("psi_step", _F, ALL, minimum=0, minimum_exclusive=True, description="In-plane angular sampling (degrees)"),
    OptionSpec("limit_tilt", _F, THREE_D, description="Limit tilt angles: positive keeps side views, negative top views"),
    OptionSpec("sym", _T, THREE_D, description="Symmetry group, e.g. C1, D2"),
    OptionSpec("relax_sym", _T, THREE_D, description="Symmetry to relax"),
    OptionSpec("offset_range", _F, ALL, minimum=0, description="Search range for origin offsets (pixels)"),
    OptionSpec("offset_step", _F, ALL, minimum=0, minimum_exclusive=True, description="Sampling step for origin offsets (pixels)"),
    OptionSpec("helical_offset_step", _F, ALL, description="Offset sampling along the helical axis (Å)"),
    OptionSpec("perturb", _F, ALL, minimum=0, maximum=1, description="Perturbation factor of the angular sampling"),
    OptionSpec("auto_refine", _S, AUTOREFINE, description="Run the 3D auto-refine procedure"),
    OptionSpec("auto_local_healpix_order", _I, AUTOREFINE, minimum=0, maximum=9,
               description="HEALPix order from which auto-refine uses local searches"),
    OptionSpec("sigma_ang", _F, THREE_D, description="Stddev on all three Euler angles for local searches"),
    OptionSpec("sigma_rot", _F, THREE_D, description="Stddev on the first Euler angle for local searches"),
    OptionSpec("sigma_tilt", _F, THREE_D, description="Stddev on the second Euler angle for local searches"),
    OptionSpec("sigma_psi", _F, ALL, description="Stddev on the in-plane angle for local searches"),
    OptionSpec("skip_align", _S, CLASSIFICATION, description="Classify without orientational assignment"),
    OptionSpec("skip_rotate", _S, CLASSIFICATION, description="Translate and classify without rotational assignment"),
    OptionSpec("bimodal_psi", _S, ALL, description="Bimodal search of the psi angle (helices)"),
    # --- Helical reconstruction ---
    OptionSpec("helix", _S, ALL, description="Helical processing"),
    OptionSpec("ignore_helical_symmetry", _S, THREE_D, description="Ignore helical symmetry"),
    OptionSpec("helical_nr_asu", _I, THREE_D, minimum=1, description="Number of helical asymmetric units per box"),
    OptionSpec("helical_twist_initial", _F, THREE_D, description="Helical twist (degrees)"),
    OptionSpec("helical_twist_min", _F, THREE_D, description="Minimum helical twist (degrees)"),
    OptionSpec("helical_twist_max", _F, THREE_D, description="Maximum helical twist (degrees)"),
    OptionSpec("helical_twist_inistep", _F, THREE_D, description="Initial step of the twist search (degrees)"),
    OptionSpec("helical_rise_initial", _F, ALL, description="Helical rise (Å)"),
    OptionSpec("helical_rise_min", _F, THREE_D, description="Minimum helical rise (Å)"),
    OptionSpec("helical_rise_max", _F, THREE_D, description="Maximum helical rise (Å)"),
    OptionSpec("helical_rise_inistep", _F, THREE_D, description="Initial step of the rise search (Å)"),
    OptionSpec("helical_nstart", _I, THREE_D, minimum=1, description="N of an N-start helix"),
    OptionSpec("helical_z_percentage", _F, THREE_D, minimum=0, maximum=1, minimum_exclusive=True,
               description="Fraction of the box length along Z used to impose helical symmetry"),
    OptionSpec("helical_inner_diameter", _F, ALL, description="Inner diameter of helical tubes (Å)"),
    OptionSpec("helical_outer_diameter", _F, ALL, description="Outer diameter of helical tubes (Å)"),
    OptionSpec("helical_symmetry_search", _S, THREE_D, description="Local refinement of helical symmetry"),
    OptionSpec("helical_sigma_distance", _F, ALL, description="Sigma of the distance along helical tracks"),
    OptionSpec("helical_keep_tilt_prior_fixed", _S, THREE_D, description="Keep helical tilt priors fixed at 90°"),
    OptionSpec("helical_exclude_resols", _T, THREE_D, description="Resolution ranges (Å) along the helical axis to exclude"),
    OptionSpec("fourier_mask", _P, ALL, description="FFTW-centred Fourier mask for the projector"),
    # --- Corrections ---
    OptionSpec("ctf", _S, ALL, description="CTF correction"),
    OptionSpec("pad_ctf", _S, ALL, until="3.1", description="CTF padding (4.0 and later stop with 'currently disabled')"),
    OptionSpec("ctf_intact_first_peak", _S, ALL, description="Ignore CTFs until their first peak"),
    OptionSpec("ctf_corrected_ref", _S, THREE_D, until="3.1", description="The references are CTF-amplitude corrected"),
    OptionSpec("ctf_phase_flipped", _S, ALL, description="The data are CTF phase-flipped"),
    OptionSpec("only_flip_phases", _S, ALL, description="Only CTF phase-flipping, no amplitude correction"),
    OptionSpec("norm", _S, ALL, description="Normalisation-error correction"),
    OptionSpec("scale", _S, ALL, description="Intensity-scale correction per image group"),
    OptionSpec("no_norm", _S, ALL, description="Switch normalisation-error correction off"),
    OptionSpec("no_scale", _S, ALL, description="Switch intensity-scale correction off"),
    # --- Stochastic gradient descent (3.1 only; 4.0 replaced it with --grad) ---
    OptionSpec("sgd", _S, CLASS3D, until="3.1", description="Stochastic gradient descent instead of EM"),
    OptionSpec("stochastic_em", _S, CLASS3D, until="3.1", description="Stochastic EM instead of SGD"),
    OptionSpec("sgd_ini_iter", _I, CLASS3D, until="3.1", minimum=0, description="Initial SGD iterations"),
    OptionSpec("sgd_fin_iter", _I, CLASS3D, until="3.1", minimum=0, description="Final SGD iterations"),
    OptionSpec("sgd_inbetween_iter", _I, CLASS3D, until="3.1", minimum=0, description="SGD iterations between initial and final"),
    OptionSpec("sgd_ini_resol", _I, CLASS3D, until="3.1", description="Resolution cutoff of the initial SGD iterations (Å)"),
    OptionSpec("sgd_fin_resol", _I, CLASS3D, until="3.1", description="Resolution cutoff of the final SGD iterations (Å)"),
    OptionSpec("sgd_ini_subset", _I, CLASS3D, until="3.1", minimum=1, description="Mini-batch size of the initial SGD iterations"),
    OptionSpec("sgd_fin_subset", _I, CLASS3D, until="3.1", minimum=1, description="Mini-batch size of the final SGD iterations"),
    OptionSpec("mu", _F, CLASSIFICATION, minimum=0, maximum=1, description="Momentum of SGD / gradient updates"),
    OptionSpec("sgd_stepsize", _F, CLASS3D, until="3.1", description="SGD step size"),
    OptionSpec("sgd_sigma2fudge_initial", _F, CLASS3D, until="3.1", description="Initial noise-variance factor for SGD"),
    OptionSpec("sgd_sigma2fudge_halflife", _I, CLASS3D, until="3.1", description="Half-life (particles) of the SGD noise factor"),
    OptionSpec("sgd_skip_anneal", _S, CLASS3D, until="3.1", description="Switch off annealing of multiple references"),
    OptionSpec("sgd_write_iter", _I, CLASS3D, until="3.1", minimum=1, description="Write the model every so many SGD iterations"),
    # --- Computation ---
    OptionSpec("pool", _I, ALL, minimum=1, description="Images pooled per thread task"),
    OptionSpec("j", _I, ALL, minimum=1, description="Threads per MPI rank"),
    OptionSpec("dont_combine_weights_via_disc", _S, ALL, description="Send summed weights over MPI instead of via files"),
    OptionSpec("onthefly_shifts", _S, ALL, description="Compute shifted images on the fly"),
    OptionSpec("no_parallel_disc_io", _S, ALL, description="Do not let MPI ranks read the disc at the same time"),
    OptionSpec("preread_images", _S, ALL, description="Read all particles into memory first"),
    OptionSpec("scratch_dir", _P, ALL, description="Local scratch directory for particle stacks"),
    OptionSpec("keep_free_scratch", _I, ALL, description="Scratch space to leave free (GB)"),
    OptionSpec("reuse_scratch", _S, ALL, description="Re-use particles already on scratch"),
    OptionSpec("keep_scratch", _S, ALL, description="Keep scratch after the run"),
    OptionSpec("fast_subsets", _S, CLASSIFICATION, description="Use subsets of the data in the first 15 iterations"),
    OptionSpec("gpu", _T, ALL, gpu=True, description="Use GPUs: a switch (true) or device ids such as '0:1'"),
    OptionSpec("free_gpu_memory", _F, ALL, gpu=True, minimum=0, description="GPU memory to leave free (MB)"),
    # --- Expert options ---
    OptionSpec("pad", _F, ALL, minimum=1, description="Oversampling (padding) factor of the reference Fourier transforms"),
    OptionSpec("ref_angpix", _F, THREE_D, minimum=0, minimum_exclusive=True, description="Pixel size of the reference (Å)"),
    OptionSpec("NN", _S, ALL, description="Nearest-neighbour instead of linear Fourier interpolation"),
    OptionSpec("r_min_nn", _I, ALL, minimum=0, description="Minimum number of Fourier shells for linear interpolation"),
    OptionSpec("verb", _I, ALL, description="Verbosity"),
    OptionSpec("random_seed", _I, ALL, minimum=0, description="Random seed (RELION's default is time-based)"),
    OptionSpec("coarse_size", _I, ALL, description="Maximum image size of the first adaptive-sampling pass"),
    OptionSpec("adaptive_fraction", _F, ALL, minimum=0, maximum=1, minimum_exclusive=True,
               description="Fraction of the weights kept in the first adaptive-oversampling pass"),
    OptionSpec("maskedge", _I, ALL, minimum=0, description="Width of the soft edge of the spherical mask (pixels)"),
    OptionSpec("fix_sigma_noise", _S, ALL, description="Fix the noise spectra"),
    OptionSpec("fix_sigma_offset", _S, ALL, description="Fix the stddev of the origin offsets"),
    OptionSpec("incr_size", _I, ALL, minimum=0, description="Fourier shells beyond the current resolution to include"),
    OptionSpec("print_metadata_labels", _S, ALL, description="Print the metadata labels and exit"),
    OptionSpec("print_symmetry_ops", _S, ALL, description="Print the symmetry matrices and exit"),
    OptionSpec("strict_highres_exp", _F, ALL, description="High-resolution limit (Å) of the expectation step"),
    OptionSpec("strict_lowres_exp", _F, ALL, description="Low-resolution limit (Å) of the expectation step"),
    OptionSpec("dont_check_norm", _S, ALL, description="Skip the check that the images are normalised"),
    OptionSpec("always_cc", _S, ALL, description="Cross-correlation in all iterations"),
    OptionSpec("solvent_correct_fsc", _S, AUTOREFINE, description="Correct the FSC for the solvent mask"),
    OptionSpec("skip_maximize", _S, ALL, description="Skip the maximisation step (only write data.star)"),
    OptionSpec("failsafe_threshold", _I, ALL, gpu=True, minimum=0,
               description="Particles allowed in GPU fail-safe mode before stopping"),
    OptionSpec("external_reconstruct", _S, THREE_D, description="Do the reconstruction outside relion_refine"),
    OptionSpec("auto_iter_max", _I, AUTOREFINE, minimum=1, description="Stop auto-refine at this iteration"),
    OptionSpec("auto_ignore_angles", _S, AUTOREFINE, description="Update the angular sampling regardless of orientation changes"),
    OptionSpec("auto_resol_angles", _S, AUTOREFINE, description="Update the angular sampling from the resolution"),
    OptionSpec("allow_coarser_sampling", _S, CLASSIFICATION, description="Allow coarser sampling while accuracies are poor"),
    OptionSpec("trust_ref_size", _S, THREE_D, description="Trust the reference's pixel and box size"),
    OptionSpec("maxsig", _I, ALL, description="Maximum number of significant poses and translations"),
    OptionSpec("skip_gridding", _S, ALL, until="3.1", description="Skip gridding in the M step"),
    OptionSpec("version", _S, ALL, description="Print the RELION version and exit"),
    # --- Added in 4.0 (3dem/relion ml_optimiser.cpp @ 2daa744) ---
    OptionSpec("ios", _P, ALL, since="4.0", description="Tomography optimisation set (fills in --i, --ref, --solvent_mask)"),
    OptionSpec("tau2_fudge_scheme", _T, CLASSIFICATION, since="4.0", description="Tau2 fudge update scheme: plain or <deflate>-step"),
    OptionSpec("center_classes", _S, CLASS2D, since="4.0", description="Re-centre classes on their centre of mass"),
    OptionSpec("auto_sampling", _S, CLASSIFICATION, since="4.0", description="Auto-sampling outside auto-refine"),
    OptionSpec("ctf_uncorrected_ref", _S, THREE_D, since="4.0", description="The references are not CTF-amplitude corrected"),
    OptionSpec("grad", _S, CLASSIFICATION, since="4.0", description="Gradient-driven (VDAM) optimisation instead of EM"),
    OptionSpec("grad_em_iters", _I, CLASSIFICATION, since="4.0", minimum=0, description="EM iterations at the end of a gradient run"),
    OptionSpec("grad_ini_frac", _F, CLASSIFICATION, since="4.0", minimum=0, maximum=1,
               minimum_exclusive=True, maximum_exclusive=True, description="Fraction of iterations in the initial phase"),
    OptionSpec("grad_fin_frac", _F, CLASSIFICATION, since="4.0", minimum=0, maximum=1,
               minimum_exclusive=True, maximum_exclusive=True, description="Fraction of iterations in the final phase"),
    OptionSpec("grad_min_resol", _I, CLASSIFICATION, since="4.0", description="Resolution (Å) for the signal under-estimation adjustment"),
    OptionSpec("grad_ini_resol", _I, CLASSIFICATION, since="4.0", description="Resolution cutoff of the initial gradient iterations (Å)"),
    OptionSpec("grad_fin_resol", _I, CLASSIFICATION, since="4.0", description="Resolution cutoff of the final gradient iterations (Å)"),
    OptionSpec("grad_ini_subset", _I, CLASSIFICATION, since="4.0", minimum=1, description="Mini-batch size of the initial gradient iterations"),
    OptionSpec("grad_fin_subset", _I, CLASSIFICATION, since="4.0", minimum=1, description="Mini-batch size of the final gradient iterations"),
    OptionSpec("grad_stepsize", _F, CLASSIFICATION, since="4.0", description="Step size of the gradient optimisation"),
    OptionSpec("grad_stepsize_scheme", _T, CLASSIFICATION, since="4.0", description="Step-size update scheme: plain or <inflate>-step"),
    OptionSpec("grad_write_iter", _I, CLASSIFICATION, since="4.0", minimum=1, description="Write the model every so many gradient iterations"),
    OptionSpec("no_init_blobs", _S, CLASSIFICATION, since="4.0", description="Do not start from random Gaussian blobs"),
    OptionSpec("som", _S, CLASSIFICATION, since="4.0", description="Self-organising map instead of classification (needs --grad)"),
    OptionSpec("som_ini_nodes", _I, CLASSIFICATION, since="4.0", minimum=1, description="Initial number of SOM nodes"),
    OptionSpec("som_connectivity", _F, CLASSIFICATION, since="4.0", minimum=0, description="Average active neighbour connections"),
    OptionSpec("som_inactivity_threshold", _F, CLASSIFICATION, since="4.0", minimum=0, description="Inactivity before a SOM node is dropped"),
    OptionSpec("som_neighbour_pull", _F, CLASSIFICATION, since="4.0", minimum=0, maximum=1, maximum_exclusive=True,
               description="Portion of the gradient applied to connected nodes"),
    OptionSpec("class_inactivity_threshold", _F, CLASSIFICATION, since="4.0", minimum=0,
               description="Replace classes with little activity in gradient classification"),
    OptionSpec("normalised_subtomo", _S, THREE_D, since="4.0", description="Subtomograms are multiplicity-normalised"),
    OptionSpec("skip_subtomo_multi", _S, THREE_D, since="4.0", description="Skip the subtomogram multiplicity correction"),
    OptionSpec("ctf3d_not_squared", _S, THREE_D, since="4.0", description="CTF3D files hold sqrt(CTF^2)"),
    OptionSpec("subtomo_multi_thr", _F, THREE_D, since="4.0", description="Threshold to drop marginal voxels in expectation"),
    OptionSpec("nr_parts_sigma2noise", _I, ALL, since="4.0", minimum=1, description="Particles per optics group for the initial noise spectra"),
    OptionSpec("dont_skip_gridding", _S, ALL, since="4.0", description="Do grid in the reconstruction (skipping is the 4.0 default)"),
    # --- Added in 5.0 (LSB-Helsinki/relion5 ml_optimiser.cpp @ aec00fc) ---
    OptionSpec("tomograms", _P, ALL, since="5.0", description="Tomograms STAR file (subtomograms as 2D stacks)"),
    OptionSpec("trajectories", _P, ALL, since="5.0", description="Tomogram motion trajectories STAR file"),
    OptionSpec("offset_range_x", _F, ALL, since="5.0", minimum=0, description="Offset search range in X (Å)"),
    OptionSpec("offset_range_y", _F, ALL, since="5.0", minimum=0, description="Offset search range in Y (Å)"),
    OptionSpec("offset_range_z", _F, ALL, since="5.0", minimum=0, description="Offset search range in Z (Å)"),
    OptionSpec("blush", _S, THREE_D, since="5.0", description="Blush regularisation of the reconstruction"),
    OptionSpec("blush_skip_spectral_trailing", _S, THREE_D, since="5.0",
               description="Skip spectral trailing in Blush (may inflate resolution estimates)"),
)

CATALOGUE: dict[str, OptionSpec] = {spec.name: spec for spec in _SPECS}

_SCRATCH = "the gateway chooses scratch space"
_CONTINUE_ONLY = "only read when continuing a run with --continue, which the gateway does not do"
_EXITS = "prints information and exits without refining"
_MPI_DEBUG = "a relion_refine_mpi debugging option"

#: Options users may not set, with the reason. Keys in CATALOGUE are real relion_refine options that
#: the gateway sets or rules out itself; the rest are options RELION reads only outside
#: MlOptimiser::parseInitial: in IOParser (--pipeline_control), in --continue mode, or in MPI debugging.
GATEWAY_OWNED: dict[str, str] = {
    "scratch_dir": _SCRATCH,
    "keep_free_scratch": _SCRATCH,
    "reuse_scratch": _SCRATCH,
    "keep_scratch": _SCRATCH,
    "pipeline_control": "RELION pipeline bookkeeping; the gateway tracks jobs through Slurm",
    "verb": "the gateway follows RELION's progress output, which --verb 0 silences",
    "version": _EXITS,
    "print_metadata_labels": _EXITS,
    "print_symmetry_ops": _EXITS,
    "continue": (
        "the gateway continues a run itself: POST /v1/relion/jobs/<job_id>/continue, or auto_continue "
        "in the request"
    ),
    "force_converge": _CONTINUE_ONLY,
    "join_random_halves": _CONTINUE_ONLY,
    "multibody_masks": _CONTINUE_ONLY,
    "multibody_norm_overlap": _CONTINUE_ONLY,
    "reconstruct_subtracted_bodies": _CONTINUE_ONLY,
    "sigma_off": _CONTINUE_ONLY,
    "halt_all_followers_except": _MPI_DEBUG,
    "keep_debug_reconstruct_files": _MPI_DEBUG,
}

# What replaced an option that a later RELION dropped, added to the "not available" message.
_SUCCESSORS: dict[str, str] = {
    "sgd": "use --grad",
    "stochastic_em": "use --grad",
    "sgd_ini_iter": "--grad_ini_frac sets the phase lengths",
    "sgd_fin_iter": "--grad_fin_frac sets the phase lengths",
    "sgd_inbetween_iter": "--iter sets the total",
    "sgd_ini_resol": "use --grad_ini_resol",
    "sgd_fin_resol": "use --grad_fin_resol",
    "sgd_ini_subset": "use --grad_ini_subset",
    "sgd_fin_subset": "use --grad_fin_subset",
    "sgd_stepsize": "use --grad_stepsize",
    "sgd_write_iter": "use --grad_write_iter",
    "ctf_corrected_ref": "4.0 assumes corrected references; send --ctf_uncorrected_ref if they are not",
    "skip_gridding": "skipping gridding is the default from 4.0 on; --dont_skip_gridding turns it on",
}

# Why an option does not fit a mode, added to the "not used by mode" message.
_MODE_REASONS: dict[tuple[str, str], str] = {
    ("K", "autorefine"): "auto-refine refines a single class",
    ("iter", "autorefine"): "auto-refine runs until it converges; --auto_iter_max caps it",
    ("ref", "2d"): "2D classification starts without a reference",
}

_GPU_IDS = re.compile(r"[0-9:,]*")


def _version_rank(relion_version: str) -> int:
    try:
        return SUPPORTED_VERSIONS.index(relion_version)
    except ValueError:
        raise ValueError(
            f"RELION version {relion_version!r} is not supported; use one of {', '.join(SUPPORTED_VERSIONS)}"
        ) from None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")


def closest_names(name: str, n: int = 3) -> list[str]:
    """Up to ``n`` catalogue names closest to ``name``, best first (difflib).

    Names are compared without case (no two catalogue names differ only in case), so ``k`` finds
    ``K`` and ``nn`` finds ``NN``: a plain difflib match would never offer ``K`` for ``k``.
    """
    by_lower = {known.lower(): known for known in CATALOGUE}
    matches = difflib.get_close_matches(name.lstrip("-").lower(), list(by_lower), n=n)
    return [by_lower[match] for match in matches]


def catalogue_for(mode: str, relion_version: str) -> list[OptionSpec]:
    """The options a user may send for ``mode`` on RELION ``relion_version``, by name (gateway-owned ones left out)."""
    _check_mode(mode)
    _version_rank(relion_version)
    specs = [
        spec
        for spec in CATALOGUE.values()
        if mode in spec.modes and spec.in_version(relion_version) and spec.name not in GATEWAY_OWNED
    ]
    return sorted(specs, key=lambda spec: (spec.name.lower(), spec.name))


def _suggestion(name: str) -> str:
    names = closest_names(name, n=1)
    return f"; did you mean --{names[0]}?" if names else ""


def _check_version(spec: OptionSpec, relion_version: str) -> None:
    if spec.in_version(relion_version):
        return
    if _version_rank(relion_version) < _version_rank(spec.since):
        raise FlagError(spec.name, f"--{spec.name} needs RELION {spec.since} or newer; this site runs {relion_version}")
    successor = _SUCCESSORS.get(spec.name)
    raise FlagError(
        spec.name,
        f"--{spec.name} is not available after RELION {spec.until}; this site runs {relion_version}"
        + (f" ({successor})" if successor else ""),
    )


def _check_mode_use(spec: OptionSpec, mode: str) -> None:
    if mode in spec.modes:
        return
    if len(spec.modes) == 1:
        (only,) = spec.modes
        message = f"--{spec.name} belongs to mode {only}, not {mode}"
    else:
        message = f"--{spec.name} is not used by mode {mode}"
    reason = _MODE_REASONS.get((spec.name, mode))
    raise FlagError(spec.name, message + (f" ({reason})" if reason else ""))


def _check_type(spec: OptionSpec, value: FlagValue) -> None:
    name = spec.name
    if spec.kind == "switch":
        if value is not True:
            raise FlagError(name, f"--{name} is a switch: send true to turn it on or leave it out, got {value!r}")
    elif spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlagError(name, f"--{name} must be a whole number, got {value!r}")
    elif spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FlagError(name, f"--{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise FlagError(name, f"--{name} must be a finite number, got {value!r}")
    elif name == "gpu":
        # --gpu is both a switch and an option: RELION reads `--gpu` alone or `--gpu 0:1`.
        if value is not True and not (isinstance(value, str) and _GPU_IDS.fullmatch(value)):
            raise FlagError(name, f"--gpu must be true or GPU device ids such as '0:1' or '0,1:2', got {value!r}")
    elif not isinstance(value, str):
        what = "a path" if spec.kind == "path" else "a string"
        raise FlagError(name, f"--{name} must be {what}, got {value!r}")
    elif spec.kind == "path":
        check_relative_path(name, value)


def _check_bounds(spec: OptionSpec, value: FlagValue) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    name = spec.name
    if spec.minimum is not None:
        if spec.minimum_exclusive and value <= spec.minimum:
            raise FlagError(name, f"--{name} must be greater than {spec.minimum:g}, got {value!r}")
        if not spec.minimum_exclusive and value < spec.minimum:
            raise FlagError(name, f"--{name} must be at least {spec.minimum:g}, got {value!r}")
    if spec.maximum is not None:
        if spec.maximum_exclusive and value >= spec.maximum:
            raise FlagError(name, f"--{name} must be less than {spec.maximum:g}, got {value!r}")
        if not spec.maximum_exclusive and value > spec.maximum:
            raise FlagError(name, f"--{name} must be at most {spec.maximum:g}, got {value!r}")


def _warnings(options: Mapping[str, FlagValue], *, gpu_allowed: bool) -> list[str]:
    notes: list[str] = []
    if options.get("random_seed") == 0:
        notes.append(
            "--random_seed 0 switches off the randomisation of the particle order "
            "(RELION warns about it on every rank)"
        )
    if "auto_iter_max" in options:
        notes.append(
            "--auto_iter_max stops auto-refine early: RELION then writes no final run_model.star, "
            "so the job will not count as converged"
        )
    if "skip_maximize" in options:
        notes.append("--skip_maximize skips the maximisation step: the run writes data.star files but no new maps")
    if "blush" in options and not gpu_allowed:
        notes.append("--blush runs a neural network in every iteration; without a GPU partition it is slow")
    return notes


def validate_options(
    options: Mapping[str, FlagValue], *, mode: str, relion_version: str, gpu_allowed: bool
) -> list[str]:
    """Raise FlagError(key, message) for the first option RELION would not take; return warnings.

    ``options`` are normalised flags (underscore names, switches as ``True``), as in NormalisedFlags.
    """
    _check_mode(mode)
    _version_rank(relion_version)
    for name, value in options.items():
        owned = GATEWAY_OWNED.get(name)
        if owned is not None:
            raise FlagError(name, f"--{name} cannot be set: {owned}")
        spec = CATALOGUE.get(name)
        if spec is None:
            raise FlagError(name, f"--{name} is not a relion_refine option{_suggestion(name)}")
        _check_version(spec, relion_version)
        _check_mode_use(spec, mode)
        if spec.gpu and not gpu_allowed:
            raise FlagError(name, f"--{name} needs a GPU partition; none is configured")
        _check_type(spec, value)
        _check_bounds(spec, value)
    return _warnings(options, gpu_allowed=gpu_allowed)
