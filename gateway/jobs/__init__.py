"""The job lifecycle: the portal's job states (and, as issue 13 proceeds, prepare, submit and track)."""
