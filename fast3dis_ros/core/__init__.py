"""Shared types (frames, windows, predictions, instance summaries) and counters: the bottom layer, imports nothing of the package."""
