"""MMM4Rec: multi-modal sequential recommendation with fused time-aware SSD kernels (model, data, training)."""

__version__ = "0.1.0"
