"""Matplotlib figures over what sessions, caches and hooks expose (imported on demand: matplotlib is heavy)."""
