"""Sampling many outputs per prompt (`mmalign generate`) and the manifest that records them."""
