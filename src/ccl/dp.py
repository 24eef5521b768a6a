"""DP-SGD's engine under its old name: the `dpsgd` defense lives in `ccl.defenses.dpsgd` (kept importable)."""

from .defenses.dpsgd import DPAccounting, DPTrainer, calibrate_noise, epsilon_spent, is_plain_mlp

__all__ = ["DPAccounting", "DPTrainer", "calibrate_noise", "epsilon_spent", "is_plain_mlp"]
