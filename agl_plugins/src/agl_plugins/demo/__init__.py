"""The main job (`agl demo`): aligned base, Fisher mask, plain LoRA vs LoRA + AGL, DriftCheck."""
