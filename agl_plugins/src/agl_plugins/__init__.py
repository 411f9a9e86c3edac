"""agl_plugins: the AGL plugin host (pluggy), the `agl` CLI and DriftCheck."""
