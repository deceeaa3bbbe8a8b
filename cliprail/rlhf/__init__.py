"""RLHF with PPO for causal language models: data, models, SFT, reward model, PPO, evaluation.

Any Hugging Face ``AutoModelForCausalLM`` from a local folder works; the demo and the tests build
a tiny GPT-2 from a config and train a tokenizer locally, so nothing is downloaded.
"""
