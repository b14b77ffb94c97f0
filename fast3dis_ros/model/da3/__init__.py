"""DA3 backbone: an exact transcription of Depth Anything 3's forward (pinned version), its weights and LoRA."""
