"""The simulated network now ships with the torture harness (``shmkv torture --simulate`` drives
it): see shmkv/torture/simnet.py. This module keeps the tests' import path."""

from shmkv.torture.simnet import Machine, SimDeadlock, SimNetwork, SimTransport, VirtualTimeLoop

__all__ = ["SimNetwork", "SimTransport", "VirtualTimeLoop", "SimDeadlock", "Machine"]
