"""The engine-agnostic KV exchange between two workers: a worker's endpoint (sending and receiving
transfers through a transport and a side channel), the outgoing transfer, pulls, the wire format, pacing,
and the allocator settings of a process that moves KV. Knows tensors and bytes, never an engine."""
