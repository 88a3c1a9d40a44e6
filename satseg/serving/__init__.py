"""Code the Triton python-backend models share (each ``model.py`` in ``triton_repo/`` stays a few lines)."""
