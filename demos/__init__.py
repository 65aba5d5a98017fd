"""The default bridge's demos: its training data (python -m demos.world_data), clips and training script."""
