"""Talking to Slurm: the scheduler interface, its CLI backend, and the job-state tables."""
