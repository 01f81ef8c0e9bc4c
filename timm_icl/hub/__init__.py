"""The Hub: export a trained model as a folder timm loads (:mod:`.export`), its model card (:mod:`.card`), and the
upload (:mod:`.push`)."""

from .card import render_model_card
from .export import export_model, resolve_model_folder
from .push import HubError, push_to_hub, validate_push

__all__ = ["HubError", "export_model", "push_to_hub", "render_model_card", "resolve_model_folder", "validate_push"]
