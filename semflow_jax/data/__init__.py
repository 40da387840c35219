"""Datasets and input pipelines: sources yield {"image": uint8 [H, W, 3], "label": uint8 [H, W]} examples."""
