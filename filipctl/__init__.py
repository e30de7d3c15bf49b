"""filipctl: orchestration for FILIP pretraining. Importing it stays light (no torch, ray, deepspeed, mlflow)."""

__version__ = "0.1.0"
