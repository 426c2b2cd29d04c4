"""Reinforcement finetuning of language models: models, tasks, rewards, sampling, gradient norms; the extract, sft and ppo workloads."""
