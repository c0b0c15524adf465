"""`python -m gateway.jobside stage-in|watch|gpu-layout|archive`: the job-side steps alone.

The sbatch templates use this form, not ``python -m gateway job``, so a process on the compute
node does not import the gateway's server side (Flask, SQLAlchemy, gunicorn, Prometheus) into
the job's memory.
"""
from gateway.jobside.program import job_group

job_group(prog_name="python -m gateway.jobside")
