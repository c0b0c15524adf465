"""RELION-specific code: the tiny test dataset, a STAR reader and the job result summaries."""
