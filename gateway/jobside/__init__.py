"""Code that runs inside the Slurm jobs (stage-in in the main job, the archive hook), not in the API."""
