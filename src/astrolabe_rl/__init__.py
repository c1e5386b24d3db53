"""astrolabe-rl: online forward-process RL for distilled autoregressive streaming video models."""

__version__ = "0.1.0"
