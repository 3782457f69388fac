"""MIMO: modality encoders + projectors + one language model, each on its own grid of the same ranks."""
