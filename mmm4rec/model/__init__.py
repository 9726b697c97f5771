"""The MMM4Rec model: configuration, building blocks (layers.py) and the recommender (mmm4rec.py)."""
from .config import MMM4RecConfig
from .mmm4rec import MMM4Rec

__all__ = ["MMM4Rec", "MMM4RecConfig"]
