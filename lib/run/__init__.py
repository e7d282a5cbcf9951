"""What a run leaves on disk: run and matrix directories, checkpoints, locks, atomic writes, evaluation."""
