"""Contracts shared by every pdflow component: ids, the request lifecycle and its transition table, the
engine Protocol, the messages workers and the front door exchange, cluster snapshots, typed errors, the
configuration models, and the gRPC ``.proto`` files with their generated stubs. It imports no other pdflow
package and nothing of Ray, vLLM or Kubernetes."""
