"""agl_hf_callback: AGL for the Hugging Face Trainer through a TrainerCallback."""
