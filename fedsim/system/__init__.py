"""The simulated world: each client's device (:mod:`fedsim.system.devices`), when it is online
(:mod:`fedsim.system.availability`), the virtual clock and the synchronous round rules
(:mod:`fedsim.system.clock`), and the world of one experiment (:mod:`fedsim.system.world`).

A pure layer below the engine: no torch, no Ray, no randomness outside the (seed, stream, round,
client) streams, no state that depends on the order of queries (docs/heterogeneity.md).
"""
