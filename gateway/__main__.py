"""Allow `python -m gateway ...`; the Slurm job scripts use this form so they need no PATH."""
from gateway.cli import main

main()
