"""agl_trl: AGL for TRL SFT and DPO trainers and scripts."""
