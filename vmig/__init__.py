"""vmig: live-migrate running KVM virtual machines over many TCP connections."""

__version__ = "0.1.0"
