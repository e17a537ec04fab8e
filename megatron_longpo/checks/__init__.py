"""One-shot checks run on lent hardware (see gpu_check.py and docs/scaling.md)."""
