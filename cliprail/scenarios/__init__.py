"""Embedded worlds that produce RLHF data with a gold judge; ``healthcare`` is the default."""
