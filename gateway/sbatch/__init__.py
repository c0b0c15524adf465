"""Rendering of the sbatch scripts the gateway submits (templates live in templates/sbatch/)."""
