"""Membership: who is in the mesh.

`members` is the pure member table and its rules, `swim` the pure SWIM/Lifeguard protocol over it (both run
unchanged in scripts/sim_membership.py), `driver` carries the protocol over gRPC on its own thread, and
`discovery` suggests peers from zeroconf.

May import: the ground floor and the transport (a Ping is a call to a peer). Nothing here knows about keys,
owners or the store.
"""
