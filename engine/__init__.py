"""Training loops, evaluation, checkpoints, logging, device policy and monitors shared by both scripts."""
