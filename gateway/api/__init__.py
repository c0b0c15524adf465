"""The REST API: schemas, the jobs blueprint and the one error shape."""
