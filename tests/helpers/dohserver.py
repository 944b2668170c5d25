"""A small DNS-over-HTTPS server for the faults a real server will not show on command:
GOAWAY, stream resets, HTTP errors, a wrong content type, one stream at a time, a tiny
flow-control window. HTTP/2 (h2) over TLS on loopback, in its own thread and event loop;
it answers every A question with 192.0.2.7 and counts connections and streams."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import dns.message
import dns.rrset
import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes


class DoHServer:
    """``mode``: ``answer``, ``goaway`` (GOAWAY instead of an answer), ``reset`` (RST_STREAM),
    ``status500``, ``text`` (content type text/plain), ``hold`` (answer only after
    ``release()``). ``max_streams`` and ``window`` go into the server's SETTINGS."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        mode: str = "answer",
        max_streams: int = 100,
        window: int = 65535,
    ) -> None:
        self.mode = mode
        self.max_streams = max_streams
        self.window = window
        self.connections = 0
        self.streams = 0
        #: The most streams open at once on one connection.
        self.peak = 0
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.context.set_alpn_protocols(["h2"])
        self.loop = asyncio.new_event_loop()
        self._released = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context), self.loop
        ).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._released.set)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.connections += 1
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window,
            },
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        tasks: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.streams += 1
                        bodies[event.stream_id] = b""
                        self.peak = max(self.peak, len(bodies))
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        task = asyncio.ensure_future(
                            self._respond(conn, writer, event.stream_id, bodies)
                        )
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif isinstance(event, h2.events.StreamReset):
                        bodies.pop(event.stream_id, None)
                writer.write(conn.data_to_send())
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _respond(
        self,
        conn: h2.connection.H2Connection,
        writer: asyncio.StreamWriter,
        sid: int,
        bodies: dict[int, bytes],
    ) -> None:
        if self.mode == "hold":
            await self._released.wait()
        body = bodies.pop(sid, b"")
        if self.mode == "goaway":
            conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
        elif self.mode == "reset":
            conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        elif self.mode == "status500":
            conn.send_headers(sid, [(b":status", b"500")], end_stream=True)
        else:
            query = dns.message.from_wire(body)
            reply = dns.message.make_response(query)
            reply.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.7")
            )
            wire = reply.to_wire()
            media = b"text/plain" if self.mode == "text" else b"application/dns-message"
            conn.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-type", media),
                    (b"content-length", str(len(wire)).encode()),
                ],
            )
            conn.send_data(sid, wire, end_stream=True)
        writer.write(conn.data_to_send())
