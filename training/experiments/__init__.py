"""Small, reproducible experiments behind the measured decisions in docs/training.md."""
