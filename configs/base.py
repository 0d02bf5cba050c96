"""Defaults shared by every qreg config: qreg.config.base_config (kept there, beside the
validation of each field, so that a workdir's config.json always loads onto them)."""
from qreg.config import base_config as get_base_config

__all__ = ["get_base_config"]
