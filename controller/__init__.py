"""The controller: one Ray actor, the single writer of cluster state. It keeps the instance registry and
health, the request log and the migration coordinator, pushes cluster snapshots to the front doors, and
serves the admin gRPC API (``pdflow.v1.Admin``) through a narrow backend interface."""
