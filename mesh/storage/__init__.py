"""Storage: the bytes at rest on this node, in RAM and on disk, under byte budgets.

`store` keeps verified blobs under a budget (LRU, RAM-pressure eviction), `disk` is its crash-safe tier, and
`budget` bounds what concurrent puts hold before they are stored.

May import: the ground floor and `mesh.transport.wire` alone of the transport, because a stored blob *is* its
wire frames (framed once as it is stored, sent as it is on every read). Nothing here talks to a peer or knows
about members.
"""
