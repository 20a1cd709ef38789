"""KV endpoints over real NIXL agents on UCX (loopback): early decoding through real notifications, raw
layers from several registered tensors in one write, and NIXL's threads at a lower priority than the
engine's."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kv_transfer.exchange.endpoint import KVEndpoint
from kv_transfer.transport.base import TransportError, XferState
from protocol.transfers import TransferOutcome
from tests.support.kv import (
    LAYERS,
    NOTHING_HELD,
    check_landed,
    kv_stack,
    make_layers,
    open_transfer,
    send_registered,
    wait_early,
)


def test_over_real_nixl_layers_are_decoded_as_they_land() -> None:
    """The same, through two real NIXL agents on UCX: each compressed layer's notification reaches the
    receiver, which decodes every layer ahead of the load."""
    from kv_transfer.transport.nixl import NixlTransport

    sender = KVEndpoint(NixlTransport("it-p", 4 << 20), timeout_s=10)
    receiver = KVEndpoint(NixlTransport("it-d", 4 << 20), timeout_s=10)
    try:
        layers = make_layers(7)
        out = open_transfer(sender, receiver, "nixl-early", "lossless")
        for i, (k, v) in enumerate(layers):
            sender.send_layer(out, i, k, v)
        sender.finish(out)
        wait_early(receiver, "nixl-early", LAYERS)
        landed = receiver.take("nixl-early")
        assert landed is not None
        for (_, k, v), (k0, v0) in zip(receiver.decode_layers(landed), layers, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        receiver.release("nixl-early", decode_s=0.0)
        assert receiver.held == NOTHING_HELD
    finally:
        sender.close()
        receiver.close()


def test_a_receiver_restarted_under_the_same_name_gets_kv_again() -> None:
    """A decode worker restarted under its old name has a new NIXL agent: the sender replaces the metadata it
    kept for that name (it once kept the old, and every write to the new agent failed)."""
    from kv_transfer.transport.nixl import NixlTransport

    sender = KVEndpoint(NixlTransport("it-rp", 4 << 20), timeout_s=10)
    for run in range(2):
        receiver = KVEndpoint(NixlTransport("it-rd", 4 << 20), timeout_s=10)
        try:
            layers = make_layers(run)
            out = open_transfer(sender, receiver, f"restart-{run}", "lossless")
            for i, (k, v) in enumerate(layers):
                sender.send_layer(out, i, k, v)
            sender.finish(out)
            wait_early(receiver, f"restart-{run}", LAYERS)
            landed = receiver.take(f"restart-{run}")
            assert landed is not None, f"run {run}: nothing landed"
            for (_, k, v), (k0, v0) in zip(receiver.decode_layers(landed), layers, strict=True):
                assert torch.equal(k, k0) and torch.equal(v, v0)
            receiver.release(f"restart-{run}", decode_s=0.0)
        finally:
            receiver.close()
    sender.close()


def test_over_real_nixl_raw_layers_from_several_registered_tensors_land_in_one_write() -> None:
    """One NIXL write may read from several registered tensors (vLLM keeps one per layer), so the layers
    merged into one land bit-exact, through the transport and through the endpoints. Spans the transport
    joins (adjacent on both sides) land as exactly as those it cannot (a layer's halves swapped)."""
    from kv_transfer.transport.nixl import NixlTransport

    here, there = NixlTransport("it-zp", 4 << 20), NixlTransport("it-zd", 4 << 20)
    try:
        here.add_peer(there.peer_info())
        layers = kv_stack(10)
        for layer in layers:
            here.register(layer)
        spans, offset, expected = [], 0, []
        for i, layer in enumerate(layers):
            half = layer.nbytes // 2
            if i == 3:  # halves swapped on arrival: adjacent here, not there
                spans += [(layer.data_ptr() + half, offset, half), (layer.data_ptr(), offset + half, half)]
                expected.append(torch.stack([layer[1], layer[0]]))
            else:  # halves adjacent on both sides
                spans += [(layer.data_ptr(), offset, half), (layer.data_ptr() + half, offset + half, half)]
                expected.append(layer)
            offset += layer.nbytes
        xfer = here.write_from("it-zd", spans)
        deadline = time.monotonic() + 10
        while (state := xfer.state()) is XferState.PENDING:
            assert time.monotonic() < deadline, "the write never landed"
            time.sleep(0.001)
        xfer.release()
        assert state is XferState.DONE
        landed = there.buffer[:offset].view(torch.bfloat16).view(len(layers), *layers[0].shape)
        assert torch.equal(landed, torch.stack(expected))
        # a span running past its tensor, or from memory never registered, is refused before anything moves
        stray = torch.zeros(64, dtype=torch.uint8)
        past = layers[0].data_ptr() + layers[0].nbytes - 8
        for bad in ([(stray.data_ptr(), 0, 64)], [(layers[1].data_ptr(), 0, 64), (past, 64, 16)]):
            with pytest.raises(TransportError, match="not in a registered tensor"):
                here.write_from("it-zd", bad)
    finally:
        here.close()
        there.close()

    sender = KVEndpoint(NixlTransport("it-zp2", 4 << 20), timeout_s=10)
    receiver = KVEndpoint(NixlTransport("it-zd2", 4 << 20), timeout_s=10)
    try:
        out = open_transfer(sender, receiver, "nixl-merged", "none")
        send_registered(sender, out, layers)
        assert sender.finish(out).outcome is TransferOutcome.SUCCESS
        check_landed(receiver, "nixl-merged", layers)
    finally:
        sender.close()
        receiver.close()


def test_nixl_threads_yield_to_the_engine() -> None:
    """NIXL's progress and UCX threads move bytes on the engine's cores: they run ``nice`` steps lower."""
    from kv_transfer.transport.nixl import NixlTransport

    def threads() -> dict[int, int]:
        return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = threads()
    transport = NixlTransport("it-nice", 1 << 20, nice=7)
    try:
        started = [nice for tid, nice in threads().items() if tid not in before]
        assert mine + 7 in started  # NIXL's progress thread (and UCX's, in a fresh process); torch's stay
    finally:
        transport.close()
