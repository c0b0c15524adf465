"""The job lifecycle: prepare (validate, plan, render), submit (idempotent), track (reconcile Slurm's
answers), the portal's job states, the typed job record; JobService ties them together."""
