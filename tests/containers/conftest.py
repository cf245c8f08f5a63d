"""The container tests run the built images (make image) as the pod runs them. They take
minutes, so `make test` leaves them out and `make test-containers` runs them (it sets
CAPTIONER_CONTAINER_TESTS=1 and builds the images first)."""

from __future__ import annotations

import os
import shutil

import pytest

from deploy.containers import REPOSITORY_IMAGE, SERVER_IMAGE, image_exists


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CAPTIONER_CONTAINER_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="container tests run with make test-containers (CAPTIONER_CONTAINER_TESTS=1)")
    for item in items:
        if "tests/containers" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def images() -> tuple[str, str]:
    """The images `make image` built; missing ones fail the run (make test-containers builds them)."""
    assert shutil.which("podman"), "podman is not installed: make image installs it"
    for image in (SERVER_IMAGE, REPOSITORY_IMAGE):
        assert image_exists(image), f"{image} is not built: make image"
    return SERVER_IMAGE, REPOSITORY_IMAGE
