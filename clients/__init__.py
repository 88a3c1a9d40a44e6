"""Scripted clients of the served ``sat`` ensemble: a Python API (:class:`SATClient`) and CLIs."""

from clients.sat_client import SATClient, Segmentation, ServerUnavailable

__all__ = ["SATClient", "Segmentation", "ServerUnavailable"]
