"""Importers of official checkpoints (METER, APT-ViLT) onto apt-deploy's models and prompt format v1."""
