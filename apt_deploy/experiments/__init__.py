"""Reproducible experiments behind the committed results (scripts/ holds thin wrappers around these)."""
