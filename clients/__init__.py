"""Scripted clients of the served ``sat`` ensemble: a Python API (:class:`SATClient`) and CLIs."""

if __name__ != "satseg_clients":  # its installed name (pyproject.toml): one module, one name
    raise ImportError(f"import satseg_clients, not {__name__}: the clients/ folder installs as satseg_clients")

from satseg_clients.sat_client import SATClient, Segmentation, ServerUnavailable

__all__ = ["SATClient", "Segmentation", "ServerUnavailable"]
