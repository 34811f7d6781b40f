"""The micro-VMM: builds a KVM machine from a VmConfig, runs its vCPUs, saves its state."""
