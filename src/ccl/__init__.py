"""ccl: train classifiers that leak less about their training data, and measure how much they leak.

Subpackages: `losses` (Convex-Concave Loss and baseline defenses), `theory` (the Gaussian advantage model),
`signals`, `attacks` and `metrics` (membership inference and its measures), `data` (datasets and membership
splits), `models` (architectures) and `training` (the resumable, deterministic training engine).
"""

from . import attacks, data, losses, metrics, models, signals, theory, training

__version__ = "0.1.0"

__all__ = ["__version__", "attacks", "data", "losses", "metrics", "models", "signals", "theory", "training"]
