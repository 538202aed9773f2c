"""Video frames: JSON and binary producers and consumers mixed, conversions once per frame, wire framing."""
from __future__ import annotations

import base64
import os
import struct

import websockets

from conftest import JPEG, frame_message
from watchout.frames import Frame, encode_binary_frame, parse_binary_frame

STREAM = "yard"


async def _producer(ws_connect, token):
    producer = await ws_connect()
    await producer.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token("alice")})
    await producer.recv_type("registered")
    return producer


async def _consumer(ws_connect, token, binary):
    consumer = await ws_connect()
    message = {"type": "subscribe", "clientType": "dashboard", "streamId": STREAM, "token": token("alice")}
    if binary:
        message["format"] = "binary"
    await consumer.send(message)
    assert (await consumer.recv_type("subscribed"))["format"] == ("binary" if binary else "json")
    return consumer


async def _next_binary(client):
    while True:
        raw = await client.recv_raw()
        if isinstance(raw, bytes):
            return raw
        assert raw is not None


async def test_json_and_binary_producers_reach_json_and_binary_consumers(ws_connect, token):
    producer = await _producer(ws_connect, token)
    json_consumer = await _consumer(ws_connect, token, binary=False)
    binary_consumer = await _consumer(ws_connect, token, binary=True)

    await producer.send(frame_message(STREAM, JPEG, timestamp=1764150000123, width=640, height=480))
    as_json = await json_consumer.recv_type("video-frame")
    assert base64.b64decode(as_json["data"]) == JPEG and as_json["timestamp"] == 1764150000123
    stream_id, frame = parse_binary_frame(await _next_binary(binary_consumer))
    assert (stream_id, frame.jpeg, frame.timestamp, frame.width, frame.height) == \
        (STREAM, JPEG, 1764150000123, 640, 480)

    other = os.urandom(5000)
    await producer.send(encode_binary_frame(STREAM, other, 1764150000456, 320, 240))
    as_json = await json_consumer.recv_type("video-frame")
    assert base64.b64decode(as_json["data"]) == other
    assert (as_json["streamId"], as_json["timestamp"], as_json["width"], as_json["height"]) == \
        (STREAM, 1764150000456, 320, 240)
    assert parse_binary_frame(await _next_binary(binary_consumer))[1].jpeg == other


async def test_large_json_frame_is_forwarded_as_the_producers_own_bytes(ws_connect, token):
    producer = await _producer(ws_connect, token)
    consumer = await _consumer(ws_connect, token, binary=False)
    data = base64.b64encode(os.urandom(100_000)).decode()
    text = '{"type":"video-frame","streamId":"%s","data":"%s","timestamp":7}' % (STREAM, data)
    await producer.send(text)
    while (raw := await consumer.recv_raw()) is not None and '"video-frame"' not in raw:
        pass
    assert raw == text


def test_each_form_is_built_once_per_frame_whatever_the_number_of_consumers():
    frame = Frame(STREAM, 1, 0, 0, jpeg=JPEG)
    assert frame.as_binary() is frame.as_binary()
    assert frame.as_json() is frame.as_json()
    assert frame.as_json().wire is frame.as_json().wire


async def test_server_frames_of_every_length_class_parse_in_a_standard_client(server, token):
    """build_ws_frame writes 7-bit, 16-bit and 64-bit lengths; a standard client (websockets) reads them."""
    async with websockets.connect(server.ws_url, max_size=None) as producer, \
            websockets.connect(server.ws_url, max_size=None) as consumer:
        await producer.send('{"type":"register","clientType":"mobile","streamId":"%s","token":"%s"}'
                            % (STREAM, token("alice")))
        await producer.recv()
        await consumer.send('{"type":"subscribe","clientType":"dashboard","streamId":"%s","format":"binary",'
                            '"token":"%s"}' % (STREAM, token("alice")))
        await consumer.recv()
        sid_len = len(STREAM)
        for jpeg_len in (1, 125 - 16 - sid_len, 126 - 16 - sid_len, 65535 - 16 - sid_len, 65536 - 16 - sid_len,
                         300_000):
            jpeg = os.urandom(jpeg_len)
            await producer.send(encode_binary_frame(STREAM, jpeg, 5, 0, 0))
            while isinstance(message := await consumer.recv(), str):
                pass
            assert message[16 + sid_len:] == jpeg and struct.unpack_from("!Q", message, 4)[0] == 5
