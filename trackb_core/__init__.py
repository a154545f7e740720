"""trackb: Python corpus -> code instruction dataset -> LoRA SFT -> honest evaluation."""

__version__ = "0.1.0"
