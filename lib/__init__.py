"""AdamWPrune: pruning during training with the state Adam already keeps."""
