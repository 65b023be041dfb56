"""A real ``modelyard serve`` (demo models, free ports) for the client tests in this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelyard.launcher import Endpoints, ServerProcess


@pytest.fixture(scope="module")
def server() -> Iterator[Endpoints]:
    """Started once per test module; SIGTERM (then SIGKILL) in teardown whatever happened."""
    with ServerProcess() as proc:
        assert proc.endpoints is not None
        yield proc.endpoints
