"""The Hub: export a trained model as a folder timm loads (:mod:`.export`), its model card, and the push."""

from .export import HubError, export_model, push_to_hub, render_model_card, resolve_model_folder, validate_push

__all__ = ["HubError", "export_model", "push_to_hub", "render_model_card", "resolve_model_folder", "validate_push"]
