"""agl_axolotl: AGL for Axolotl as a plugin."""
