"""PPO stage: pure math in `stages.ppo.core`; the trainer builds on it."""
