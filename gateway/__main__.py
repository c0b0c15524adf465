"""Allow `python -m gateway ...` (the job scripts use `python -m gateway.jobside`, which imports less)."""
from gateway.cli import main

main()
