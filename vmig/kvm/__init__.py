"""Thin, typed KVM bindings in ctypes: `Kvm` owns /dev/kvm, `Vm` a VM, `Vcpu` a vCPU.

Knows nothing of migration or sockets. Every fd and mapping has one owner with
`close()` and a context manager; every failed ioctl becomes `KvmError(name, errno)`.
"""

from vmig.kvm.system import Kvm
from vmig.kvm.vcpu import Vcpu, VcpuExit
from vmig.kvm.vm import Vm

__all__ = ["Kvm", "Vcpu", "VcpuExit", "Vm"]
