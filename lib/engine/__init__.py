"""The training engine: the one loop (Trainer), its tasks, lr schedules, signals, DDP and console output."""
