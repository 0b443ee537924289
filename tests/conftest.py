"""Shared fixtures: the lab VM host (a real sshd on loopback) and an SSH connection to it."""

from __future__ import annotations

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.lab.vmhost import LabHost
from fleetbisect.remote.ssh import SSHRemote


@pytest.fixture(scope="session")
def lab_host(tmp_path_factory):
    """A started LabHost (sshd on 127.0.0.1:<free port>), stopped by PID at the end."""
    host = LabHost.start(tmp_path_factory.mktemp("lab-host"), name="lab-host")
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def ssh(lab_host):
    """An SSHRemote connected to the lab host; closed after the test."""
    remote = SSHRemote.connect(lab_host.ssh_params(), deadline=Deadline.after(15))
    try:
        yield remote
    finally:
        remote.close()
