"""Training recipe components: objectives, conditioning, LoRA, checkpoints, the loop."""
