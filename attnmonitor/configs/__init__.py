"""Hydra configuration of the main job (YAML; this file makes the folder importable for Hydra)."""
