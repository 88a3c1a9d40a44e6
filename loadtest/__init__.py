if __name__ != "satseg_loadtest":  # its installed name (pyproject.toml): one module, one name
    raise ImportError(f"import satseg_loadtest, not {__name__}: the loadtest/ folder installs as satseg_loadtest")
