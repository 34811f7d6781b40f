"""Sockets for the migration protocol: addresses, byte streams, connection pools.

Knows the protocol core (vmig.proto) but never KVM or the VMM: guest memory
reaches it only as memoryviews handed in by the migration layer.
"""
