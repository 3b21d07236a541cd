"""megedit: massive knowledge editing with MeG (dynamic weight generation)."""

__version__ = "0.1.0"
