"""Backbone adapters, one file per model family, registered by decorator (see :mod:`.registry`)."""

from apt_deploy.backbones.registry import BackboneSpec, get_backbone, known_backbones, register_backbone, spec_for_model

__all__ = ["BackboneSpec", "get_backbone", "known_backbones", "register_backbone", "spec_for_model"]
