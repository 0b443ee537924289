"""fleetbisect: bisect Linux kernel regressions unattended on remote machines over SSH."""

__version__ = "0.1.0"
