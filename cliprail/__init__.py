"""cliprail: Proximal Policy Optimization, correct, fast and instrumented.

``cliprail.ppo`` holds the maths both worlds share; ``cliprail.rl`` trains on Gymnasium envs.
"""

__version__ = "0.1.0"
