if __name__ != "satseg_training":  # its installed name (pyproject.toml): one module, one name
    raise ImportError(f"import satseg_training, not {__name__}: the training/ folder installs as satseg_training")
