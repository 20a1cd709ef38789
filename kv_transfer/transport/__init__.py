"""Transports move bytes between workers' registered staging buffers: NIXL (UCX) for real, an in-process fake
for unit tests. Also the staging arena (leased regions) and the side channel (handshake and control messages).
They know nothing of codecs or requests."""
