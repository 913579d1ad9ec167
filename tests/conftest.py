"""Fixtures for the integration tests that build a simulated VPC (tests/lab.py)."""

import pytest

from lab import Lab, lab_usable


@pytest.fixture(scope="session")
def lab_support():
    """Whether labs can be built here, checked once: (usable, reason)."""
    return lab_usable()


@pytest.fixture
def make_lab(lab_support):
    """make_lab(**options) -> a built Lab, torn down after the test (also on
    failure). Skips the test when namespaces cannot be used here."""
    usable, reason = lab_support
    if not usable:
        pytest.skip(reason)
    labs = []

    def build(**options):
        lab = Lab(**options)
        labs.append(lab)
        return lab.__enter__()

    yield build
    for lab in labs:
        lab.teardown()


@pytest.fixture
def lab(make_lab):
    """The default lab: two ENIs (eth0 in 198.51.100.0/24, eth1 in
    203.0.113.0/24), two addresses each, IPv6, IMDSv2 enforced."""
    return make_lab()


def pytest_report_header(config):
    """Where the tests run, as fresh_root finds out (the nested tests skip in
    a chroot or a container)."""
    import fresh_root
    return "runs in: %s" % fresh_root.whereabouts()
