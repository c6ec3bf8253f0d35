"""The coord actor: the node's record in the mesh's NATS JetStream bucket, and everyone else's
turned into peers (README: Coordination)."""
