"""The transport: how one node talks to another.

The chunk format on the wire (`wire`), which links to compress (`link`), fair transfer slots (`turns`), the
cluster-secret handshake (`auth`), TLS (`tls`), gates per session and source host (`admission`), refused
members (`revocation`), one client per peer (`peer`) and the node's pool of them with
its circuit breakers (`peers`); `base` names what the layers above ask of a peer, so they can be given a fake.

May import: the ground floor only (`mesh.pb`, `mesh.address`, `mesh.buffers`, `mesh.watchdog`, `mesh.units`,
`mesh.files`).
Nothing here knows about keys' owners, members or the store.
"""
