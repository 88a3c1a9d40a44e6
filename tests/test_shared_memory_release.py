"""Unregistering a shared-memory region the server still holds for an answered request (a race Triton shows
on a loaded host): that refusal is waited out, any other is raised at once."""

from __future__ import annotations

import pytest

from satseg_clients.shared_memory import unregister_when_released


class Refusing:
    """A connection whose unregister fails with ``message`` ``times`` times, then succeeds."""

    def __init__(self, times: int, message: str) -> None:
        self.left, self.message, self.calls = times, message, 0

    def unregister_system_shared_memory(self, name: str, headers: dict[str, str]) -> None:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise RuntimeError(self.message)


def test_a_region_still_in_use_is_unregistered_once_released() -> None:
    connection = Refusing(3, "Cannot unregister shared memory region 'sat-1', it is currently in use.")
    unregister_when_released(connection, "sat-1", {})
    assert connection.calls == 4


def test_any_other_refusal_is_raised_at_once() -> None:
    connection = Refusing(1, "Unable to find system shared memory region: 'sat-1'")
    with pytest.raises(RuntimeError, match="Unable to find"):
        unregister_when_released(connection, "sat-1", {})
    assert connection.calls == 1
