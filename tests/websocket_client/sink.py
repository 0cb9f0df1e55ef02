"""A WebSocket server made with the `websockets` library (tests/python-clients): it accepts
connections on one path, checks Basic credentials, offers the subprotocol iot.v1, and prints one
JSON line per connection and per received frame on standard output.

    python sink.py PORT PATH USER PASSWORD
"""
import asyncio
import base64
import http
import json
import sys

from websockets.asyncio.server import serve

PORT, PATH, USER, PASSWORD = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
EXPECTED = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def emit(event):
    print(json.dumps(event), flush=True)


def check(connection, request):
    if request.path != PATH:
        return connection.respond(http.HTTPStatus.NOT_FOUND, "no such path\n")
    if request.headers.get("Authorization") != EXPECTED:
        emit({"event": "refused", "authorization": request.headers.get("Authorization")})
        return connection.respond(http.HTTPStatus.UNAUTHORIZED, "wrong credentials\n")
    return None


async def handler(ws):
    request = ws.request
    emit({
        "event": "connect",
        "protocol": ws.subprotocol,
        "origin": request.headers.get("Origin"),
        "tenant": request.headers.get("X-Tenant"),
    })
    async for message in ws:
        if isinstance(message, bytes):
            emit({"event": "binary", "length": len(message)})
        else:
            emit({"event": "text", "text": message})


async def main():
    async with serve(handler, "127.0.0.1", PORT, subprotocols=["iot.v1"], process_request=check):
        emit({"event": "ready"})
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
