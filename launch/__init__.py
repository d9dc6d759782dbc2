"""SLURM and local launch helpers."""
