"""REST-shaped requests as frames: what the session stream and the in-process mode send for each request."""

from __future__ import annotations

import numpy as np

from synapse_client._frames import frame_of


def test_a_call_becomes_a_call_frame_with_its_fields():
    x = np.ones((1, 2), np.float32)
    frame = frame_of("POST", "/v1/synapses/enc%2Fx/forward?owner=alice", {"inputs": x, "return": ["outputs"]},
                     {"Idempotency-Key": "k-1", "If-Match": '"7"'})
    assert frame == {"owner": "alice", "name": "enc/x", "operation": "forward", "return": ["outputs"],
                     "tensors": {"inputs": x}, "idempotency_key": "k-1", "if_match": 7, "op": "call"}


def test_frames_of_one_path_share_nothing():
    """Paths are parsed once each (a loop repeats them); the frames built from them are each the caller's own."""
    path = "/v1/synapses/enc/filters.png?owner=alice&scale=3"
    first = frame_of("GET", path, None, None)
    first["options"]["scale"] = "99"
    first["owner"] = "mallory"
    second = frame_of("GET", path, None, None)
    assert second == {"owner": "alice", "name": "enc", "options": {"scale": "3"}, "op": "filters"}
    call = frame_of("POST", "/v1/synapses/enc/forward", {"inputs": 1}, None)
    call["tensors"]["inputs"] = 2
    assert frame_of("POST", "/v1/synapses/enc/forward", {"inputs": 1}, None)["tensors"] == {"inputs": 1}


def test_paths_frames_do_not_carry_give_none():
    assert frame_of("GET", "/healthz", None, None) is None
    assert frame_of("PATCH", "/v1/synapses/enc", {}, None) is None
    assert frame_of("GET", "/v2/synapses", None, None) is None
