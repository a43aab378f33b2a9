"""The cluster: which nodes own a key, and how a read or a write reaches them.

`ring` is consistent hashing, `directory` the members routing needs, `routing` the reads and writes over the
owners, `repair` anti-entropy back to R copies, `singleflight` the coalescing of concurrent reads.

May import: the ground floor, the transport, storage and membership. Only the node's top floor (`mesh.node`,
`mesh.server`, `mesh.client`, `mesh.cli`) imports this.
"""
