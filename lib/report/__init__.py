"""What the results say: summaries, significance, claims, costs (FLOPs, compression) and trackers."""
