"""Every loss and regulariser: pure functions returning (loss, stats), registered by name."""
