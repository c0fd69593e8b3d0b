"""A fake FreeSWITCH for tests: an inbound event socket server and an outbound ``socket`` caller.

It speaks mod_event_socket's real wire format, as captured from FreeSWITCH 1.10.12
(``fixtures/esl-events-1.10.12.txt``, ``fixtures/esl-misc-1.10.12.txt``): ``auth/request``,
``command/reply`` with ``Reply-Text``, ``api/response`` with ``Content-Length``,
``text/event-plain`` whose body (URL-encoded headers and the trailing blank line) is counted by
``Content-Length``, and ``text/disconnect-notice``. Events are the captured frames, edited.

The server runs in plain threads with blocking sockets, so it works the same whether the bridge
under test runs in this process (gevent, not monkey-patched) or in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

FIXTURES = Path(__file__).parent / "fixtures"
EVENTS_CAPTURE = FIXTURES / "esl-events-1.10.12.txt"
MISC_CAPTURE = FIXTURES / "esl-misc-1.10.12.txt"
IDENTITY_CAPTURE = FIXTURES / "esl-identity-1.10.12.txt"

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
ACCEPTED = b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
INVALID = b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n"
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
DISCONNECT_NOTICE = b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n%s" % (
    len(GOODBYE),
    GOODBYE,
)

# switch_url_encode's unsafe set (switch_utils.h): these and non-printables become %XX.
_UNSAFE = set('\r\n #%&+:;<=>?@[\\]^`{|}"')

CAPTURED_SIP_UUID = "411a5f36-9fc4-4dfd-95b0-90478d9068d5"


def fs_url_encode(value: str) -> str:
    """Encode a header value the way FreeSWITCH does (``+`` becomes ``%2B``, a space ``%20``)."""
    out: list[str] = []
    for char in value:
        if char in _UNSAFE or not char.isprintable() or ord(char) > 126:
            out.extend(f"%{byte:02X}" for byte in char.encode())
        else:
            out.append(char)
    return "".join(out)


def reply(text: str) -> bytes:
    """A ``command/reply`` frame (its Reply-Text is not URL-encoded)."""
    return f"Content-Type: command/reply\nReply-Text: {text}\n\n".encode()


def api_response(body: str) -> bytes:
    """An ``api/response`` frame."""
    data = body.encode()
    return b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(data), data)


def event_frame(body: str) -> bytes:
    """A ``text/event-plain`` frame around a serialized event body."""
    data = body.encode()
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(data), data)


# --- the captures -----------------------------------------------------------------------------------


def split_stream(data: bytes) -> list[tuple[list[tuple[str, str]], bytes]]:
    """Split a raw ESL byte stream into (headers, body) frames; an independent reference parser."""
    frames: list[tuple[list[tuple[str, str]], bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n\n", pos)
        headers: list[tuple[str, str]] = []
        for line in data[pos:end].decode().split("\n"):
            name, _, value = line.partition(": ")
            headers.append((name, value))
        pos = end + 2
        length = int(dict(headers).get("Content-Length", "0"))
        frames.append((headers, data[pos : pos + length]))
        pos += length
    return frames


def captured_events() -> list[str]:
    """The bodies of every event frame in the events capture, in order."""
    return [
        body.decode()
        for headers, body in split_stream(EVENTS_CAPTURE.read_bytes())
        if dict(headers).get("Content-Type") == "text/event-plain"
    ]


def captured(name: str, *, subclass: str = "", channel: str = "") -> str:
    """The first captured event body with this Event-Name (and subclass, or channel name prefix)."""
    for body in captured_events():
        values = header_values(body)
        if values.get("Event-Name") != name:
            continue
        if subclass and values.get("Event-Subclass") != subclass:
            continue
        if channel and not values.get("Channel-Name", "").startswith(channel):
            continue
        return body
    raise LookupError(f"no captured {name} {subclass or channel}")


def identity_frames(content_type: str) -> list[str]:
    """Bodies of one content type in the identity capture (spoofed From/To, wrong passwords)."""
    return [
        body.decode()
        for headers, body in split_stream(IDENTITY_CAPTURE.read_bytes())
        if dict(headers).get("Content-Type") == content_type
    ]


def identity_events(name: str) -> list[Any]:
    """The events of the identity capture with this subclass (CUSTOM) or Event-Name, parsed."""
    from forum_bridge.adapters.freeswitch.esl import parse_event_plain

    events = [parse_event_plain(body.encode()) for body in identity_frames("text/event-plain")]
    return [e for e in events if name in (e.subclass, e.name) and (e.name != "CUSTOM" or e.subclass == name)]


def identity_answers() -> list[str]:
    """The api answers at the end of the identity capture, in order: ``sofia xmlstatus``,
    ``sofia xmlstatus profile internal reg``, ``show channels as json`` (twice), ``uuid_getvar`` of
    the live channel's ``sip_auth_username`` and of a channel that does not exist."""
    return identity_frames("api/response")


def header_values(body: str) -> dict[str, str]:
    """First decoded value of each header of a serialized event."""
    values: dict[str, str] = {}
    for line in body.split("\n\n", 1)[0].split("\n"):
        name, _, value = line.partition(": ")
        values.setdefault(name, unquote(value))
    return values


def edit_event(body: str, changes: dict[str, str] | None = None, *, remove: Iterable[str] = ()) -> str:
    """Set header values (encoded like FreeSWITCH) in a serialized event; add missing ones at the end."""
    changes = dict(changes or {})
    dropped = set(remove)
    head, _, rest = body.partition("\n\n")
    lines = []
    for line in head.split("\n"):
        name = line.partition(": ")[0]
        if name in dropped:
            continue
        if name in changes:
            lines.append(f"{name}: {fs_url_encode(changes.pop(name))}")
        else:
            lines.append(line)
    lines.extend(f"{name}: {fs_url_encode(value)}" for name, value in changes.items())
    return "\n".join(lines) + "\n\n" + rest


def retarget(body: str, tokens: dict[str, str]) -> str:
    """Replace whole tokens (``1000``, a UUID, a number) inside every decoded header value."""
    head, _, rest = body.partition("\n\n")
    alternatives = "|".join(re.escape(old) for old in sorted(tokens, key=len, reverse=True))
    pattern = re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])")
    lines = []
    for line in head.split("\n"):
        name, sep, value = line.partition(": ")
        decoded = pattern.sub(lambda match: tokens[match.group(0)], unquote(value))
        lines.append(f"{name}{sep}{fs_url_encode(decoded)}" if sep else line)
    return "\n".join(lines) + "\n\n" + rest


def now_stamp() -> str:
    """``Event-Date-Timestamp`` for now (microseconds)."""
    return str(int(time.time() * 1_000_000))


def contact_of(user: str, port: int) -> str:
    """The Contact header a phone of ``user`` on ``port`` registers (as FreeSWITCH reports it)."""
    return f'"" <sip:{user}@127.0.0.1:{port}>'


def register_event(user: str, port: int = 5091, expires: int = 60) -> str:
    """``sofia::register`` of ``user`` (first time or refresh), from the capture."""
    body = retarget(captured("CUSTOM", subclass="sofia::register"), {"1000": user, "5091": str(port)})
    return edit_event(
        body,
        {"expires": str(expires), "contact": contact_of(user, port), "Event-Date-Timestamp": now_stamp()},
    )


def unregister_event(user: str, port: int = 5091) -> str:
    """``sofia::unregister`` (REGISTER with Expires: 0)."""
    body = retarget(captured("CUSTOM", subclass="sofia::unregister"), {"1000": user, "5091": str(port)})
    return edit_event(body, {"contact": contact_of(user, port), "Event-Date-Timestamp": now_stamp()})


def expire_event(user: str, port: int = 5091) -> str:
    """``sofia::expire`` (the registration ran out; ``expires`` is absolute)."""
    body = retarget(captured("CUSTOM", subclass="sofia::expire"), {"1001": user, "5091": str(port)})
    return edit_event(body, {"contact": contact_of(user, port), "Event-Date-Timestamp": now_stamp()})


def register_failure_event(user: str, port: int = 5091) -> str:
    """What FreeSWITCH sends for ``user``'s wrong password (403): ``sofia::register_attempt`` with
    ``auth-result: FORBIDDEN`` naming the digest user. (The ``sofia::register_failure`` that follows
    names only the To header, which the bridge does not trust.)"""
    forbidden = next(
        body
        for body in identity_frames("text/event-plain")
        if "register_attempt" in body and "FORBIDDEN" in body
    )
    body = retarget(forbidden, {"1000": user, "59423": str(port)})
    return edit_event(body, {"contact": contact_of(user, port), "Event-Date-Timestamp": now_stamp()})


def register_failure_only_event(user: str, port: int = 5091) -> str:
    """``sofia::register_failure`` of a REGISTER whose To user is ``user``, as captured."""
    body = retarget(captured("CUSTOM", subclass="sofia::register_failure"), {"1001": user, "5091": str(port)})
    return edit_event(body, {"Event-Date-Timestamp": now_stamp()})


def channel_create_event(uuid: str, user: str, number: str) -> str:
    """CHANNEL_CREATE of a call ``user``'s phone places to ``number`` (Call-Direction: inbound)."""
    body = retarget(
        captured("CHANNEL_CREATE", channel="sofia/"), {"1000": user, "9198": number, CAPTURED_SIP_UUID: uuid}
    )
    return edit_event(body, {"Event-Date-Timestamp": now_stamp()})


def ringing_leg_event(uuid: str, user: str, caller: str = "1000") -> str:
    """CHANNEL_CREATE of a leg that rings ``user``'s phone, as the ``user/`` endpoint makes it."""
    body = retarget(
        captured("CHANNEL_CREATE", channel="sofia/"), {"9198": user, "1000": caller, CAPTURED_SIP_UUID: uuid}
    )
    return edit_event(
        body,
        {
            "Channel-Name": f"sofia/internal/{user}@127.0.0.1:5091",
            "Call-Direction": "outbound",
            "Presence-Call-Direction": "outbound",
            "Caller-Direction": "outbound",
            "Caller-Logical-Direction": "outbound",
            "variable_direction": "outbound",
            "variable_dialed_user": user,
            "variable_dialed_domain": "127.0.0.1",
            "Event-Date-Timestamp": now_stamp(),
        },
    )


def hangup_event(uuid: str, user: str = "1000", number: str = "9198") -> str:
    """CHANNEL_HANGUP_COMPLETE of a call made by :func:`channel_create_event`."""
    body = retarget(
        captured("CHANNEL_HANGUP_COMPLETE", channel="sofia/"),
        {"1000": user, "9198": number, CAPTURED_SIP_UUID: uuid},
    )
    return edit_event(body, {"Event-Date-Timestamp": now_stamp()})


def channel_data(uuid: str, user: str, number: str) -> bytes:
    """The outbound socket's answer to ``connect``: the channel as a CHANNEL_DATA header block.

    FreeSWITCH serializes the event itself, appending Content-Type, Reply-Text (``+OK\\n``
    URL-encoded), Socket-Mode and Control last; there is no outer frame line.
    """
    return channel_data_of(uuid, user, number)


def channel_data_of(
    uuid: str, user: str, number: str, changes: dict[str, str] | None = None, *, remove: Iterable[str] = ()
) -> bytes:
    """:func:`channel_data` with some channel headers changed or removed (a spoofed From, say)."""
    body = channel_create_event(uuid, user, number)
    body = edit_event(
        body, {"Event-Name": "CHANNEL_DATA", "Channel-State": "CS_EXECUTE", **(changes or {})}, remove=remove
    )
    head = body.split("\n\n", 1)[0]
    tail = "Content-Type: command/reply\nReply-Text: %2BOK%0A\nSocket-Mode: async\nControl: full"
    return f"{head}\n{tail}\n\n".encode()


# --- the inbound event socket ---------------------------------------------------------------------


class Subscription:
    """What one ``event plain ...`` command asked for, read the way mod_event_socket reads it."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.subclasses: set[str] = set()

    def add(self, command: str) -> bool:
        """Apply an ``event`` command; False when it names nothing (FreeSWITCH: -ERR)."""
        words = command.split()[1:]
        if words and words[0] in ("plain", "json", "xml"):
            words = words[1:]
        custom = False
        named = False
        for word in words:
            if custom:
                self.subclasses.add(word)  # every word after CUSTOM is a subclass
            else:
                named = True
                self.names.add(word)
                custom = word == "CUSTOM"
        return named

    def wants(self, body: str) -> bool:
        """True when FreeSWITCH would deliver this event to the listener."""
        values = header_values(body)
        name = values.get("Event-Name", "")
        if "ALL" in self.names:
            return True
        if name not in self.names:
            return False
        return name != "CUSTOM" or values.get("Event-Subclass", "") in self.subclasses


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.authenticated = False
        self.subscription = Subscription()
        self.closed = False

    def send(self, data: bytes) -> bool:
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
            except OSError:
                self.close()
                return False
            return True

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class FakeEslServer:
    """mod_event_socket on 127.0.0.1, port 0, with state the tests control."""

    def __init__(self, password: str = "ClueCon") -> None:
        self.password = password
        self.registrations: list[dict[str, str]] = []
        self.channels: list[dict[str, str]] = []
        self.commands: list[str] = []
        self.auth_attempts = 0
        self.accepted = 0  # TCP connections accepted
        self.refused = 0  # connections closed at once while "down"
        self.down = False
        self.drop_on: str | None = None  # close the connection when a command starts with this, once
        self.before_reply: Callable[[str], None] | None = None  # runs before each command's reply
        # mod_hash's "db" table (keys are "<realm>_<key>", as mod_hash stores them) and the loaded
        # modules module_exists answers for; clear "mod_hash" to play a FreeSWITCH without it.
        self.hash_db: dict[str, str] = {}
        self.modules: set[str] = {
            "mod_commands",
            "mod_dialplan_xml",
            "mod_dptools",
            "mod_event_socket",
            "mod_hash",
            "mod_sofia",
        }
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stopped = False

    # --- life cycle ---

    def start(self) -> FakeEslServer:
        """Start accepting connections."""
        self._listener.listen(16)
        thread = threading.Thread(target=self._accept_loop, name="fake-esl-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop accepting, drop every connection and wait for the threads."""
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.drop()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.down:
                self.refused += 1
                sock.close()
                continue
            conn = _Connection(sock)
            with self._lock:
                self._connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="fake-esl-conn", daemon=True)
            thread.start()
            self._threads.append(thread)

    # --- what the tests do ---

    @property
    def live(self) -> list[_Connection]:
        """Connections not closed yet."""
        with self._lock:
            return [c for c in self._connections if not c.closed]

    def subscribed(self) -> int:
        """Connections that are authenticated and subscribed to events."""
        return sum(1 for c in self.live if c.authenticated and c.subscription.names)

    def push_event(self, body: str) -> int:
        """Send an event to every connection subscribed to it; return how many got it."""
        frame = event_frame(body)
        return sum(1 for c in self.live if c.authenticated and c.subscription.wants(body) and c.send(frame))

    def send_raw(self, data: bytes) -> int:
        """Send bytes as they are to every authenticated connection."""
        return sum(1 for c in self.live if c.authenticated and c.send(data))

    def drop(self) -> None:
        """Close every connection now, without a goodbye."""
        for conn in self.live:
            conn.close()

    def set_down(self, down: bool) -> None:
        """Going down drops every connection; while down, new connections are closed at once."""
        self.down = down
        if down:
            self.drop()

    def kills(self) -> list[str]:
        """The ``api uuid_kill`` commands received."""
        return [c for c in self.commands if c.startswith("api uuid_kill ")]

    def add_registration(self, user: str, port: int = 5091, *, auth_user: str | None = None) -> None:
        """A registered contact: a row of ``show registrations`` and of sofia's own table.

        ``auth_user`` is who authenticated (default ``user``, the address registered).
        """
        self.registrations.append(
            {
                "_auth_user": user if auth_user is None else auth_user,
                "reg_user": user,
                "realm": "127.0.0.1",
                "token": f"reg-{user}-{port}@127.0.0.1",
                "url": f"sofia/internal/sip:{user}@127.0.0.1:{port}",
                "expires": str(int(time.time()) + 120),
                "network_ip": "127.0.0.1",
                "network_port": str(port),
                "network_proto": "udp",
                "hostname": "vm",
                "metadata": "",
            }
        )

    def remove_registration(self, user: str, port: int = 5091) -> None:
        """Forget a row of ``show registrations`` (no event)."""
        url = f"sofia/internal/sip:{user}@127.0.0.1:{port}"
        self.registrations = [r for r in self.registrations if r["url"] != url]

    def flush_registration(self, user: str, port: int = 5091) -> None:
        """``sofia profile internal flush_inbound_reg``: sofia forgets the contact at once, the core's
        ``show registrations`` keeps listing it until its expiry (seen on FreeSWITCH 1.10.12)."""
        for row in self.registrations:
            if row["url"] == f"sofia/internal/sip:{user}@127.0.0.1:{port}":
                row["_flushed"] = "yes"

    def register(self, user: str, port: int = 5091) -> int:
        """A phone registers (or refreshes): FreeSWITCH's table and the event."""
        self.remove_registration(user, port)
        self.add_registration(user, port)
        return self.push_event(register_event(user, port))

    def unregister(self, user: str, port: int = 5091) -> int:
        """A phone unregisters (Expires: 0): FreeSWITCH's table and the event."""
        self.remove_registration(user, port)
        return self.push_event(unregister_event(user, port))

    def add_channel(self, uuid: str, user: str, number: str, direction: str = "inbound") -> None:
        """A row of ``show channels``."""
        self.channels.append(
            {
                "uuid": uuid,
                "direction": direction,
                "name": f"sofia/internal/{user}@127.0.0.1",
                "cid_num": user,
                "dest": number,
                "presence_id": f"{user}@127.0.0.1",
                "callstate": "ACTIVE",
                "_user": user,
            }
        )

    # --- one connection ---

    def _serve(self, conn: _Connection) -> None:
        conn.send(AUTH_REQUEST)
        buffer = b""
        while not conn.closed:
            try:
                chunk = conn.sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                command = raw.decode(errors="replace").strip("\n")
                if command:
                    self._command(conn, command)
        conn.close()

    def _command(self, conn: _Connection, command: str) -> None:
        self.commands.append(command)
        if self.drop_on is not None and command.startswith(self.drop_on):
            self.drop_on = None
            conn.close()
            return
        if self.before_reply is not None:
            self.before_reply(command)
        if command.startswith("auth "):
            self.auth_attempts += 1
            if command[5:] == self.password:
                conn.authenticated = True
                conn.send(ACCEPTED)
            else:
                conn.send(INVALID + DISCONNECT_NOTICE)
                conn.close()
            return
        if command == "exit":
            conn.send(reply("+OK bye") + DISCONNECT_NOTICE)
            conn.close()
            return
        if not conn.authenticated:
            conn.send(reply("-ERR command not found"))
            return
        if command.startswith("event "):
            ok = conn.subscription.add(command)
            conn.send(reply("+OK event listener enabled plain" if ok else "-ERR no keywords supplied"))
        elif command.startswith("api "):
            conn.send(api_response(self._api(command[4:])))
        else:
            conn.send(reply("-ERR command not found"))

    def _api(self, command: str) -> str:
        if command == "show registrations as json":
            return _json_rows(self.registrations)
        if command == "sofia xmlstatus":
            return _sofia_profiles()
        if command == "sofia xmlstatus profile internal reg":
            return _sofia_registrations(self.registrations)
        if command.startswith("uuid_getvar "):
            return self._getvar(command.split()[1:])
        if command == "show channels as json":
            return _json_rows(self.channels)
        if command == "status":
            return "UP 0 years, 0 days, 0 hours, 0 minutes, 45 seconds\nFreeSWITCH (Version 1.10.12-release  64bit) is ready\n"
        if command.startswith("uuid_kill "):
            uuid = command.split()[1]
            if any(c["uuid"] == uuid for c in self.channels):
                self.channels = [c for c in self.channels if c["uuid"] != uuid]
                return "+OK\n"
            return "-ERR No such channel!\n"
        verb = command.split()[0] if command.split() else ""
        if verb == "module_exists" and "mod_commands" in self.modules:
            return "true" if command[len(verb) :].strip() in self.modules else "false"
        if verb in ("hash", "hash_dump") and "mod_hash" in self.modules:
            return self._hash(verb, command[len(verb) :].strip())
        return f"-ERR {verb} Command not found!\n"

    def _getvar(self, args: list[str]) -> str:
        uuid, variable = [*args, "", ""][:2]
        channel = next((c for c in self.channels if c["uuid"] == uuid), None)
        if channel is None:
            return "-ERR No such channel!\n"
        placed = channel["direction"] == "inbound"
        # The authenticated user of a placed leg, the directory user of a leg ringing a phone.
        wanted = {True: "sip_auth_username", False: "dialed_user"}[placed]
        return channel["_user"] if variable == wanted else "_undef_"

    def _hash(self, verb: str, arguments: str) -> str:
        """mod_hash's ``hash`` and ``hash_dump db [realm]`` API, as mod_hash.c answers them."""
        if verb == "hash_dump":
            words = arguments.split()
            if not words or words[0] != "db":
                return "Usage: all|limit|db [<realm>]\n"
            realm = f"{words[1]}_" if len(words) > 1 else ""
            return "".join(f"D/{k}/{v}\n" for k, v in self.hash_db.items() if realm in k)
        parts = arguments.split("/", 3)
        if len(parts) < 3 or not parts[0]:
            return "-ERR Usage: hash insert|insert_ifempty|select|delete|delete_ifmatch/realm/key[/value]\n"
        action, key = parts[0].lower(), f"{parts[1]}_{parts[2]}"
        if action == "insert" and len(parts) == 4:
            self.hash_db[key] = parts[3]
            return "+OK\n"
        if action == "delete":
            return "+OK\n" if self.hash_db.pop(key, None) is not None else "-ERR Not found\n"
        if action == "select":
            return self.hash_db.get(key, "")
        return "-ERR Usage: hash insert|insert_ifempty|select|delete|delete_ifmatch/realm/key[/value]\n"


def _json_rows(rows: list[dict[str, str]]) -> str:
    # FreeSWITCH leaves "rows" out altogether when there are none.
    if not rows:
        return '{"row_count":0}\n'
    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    return json.dumps({"row_count": len(rows), "rows": public}) + "\n"


def _sofia_profiles() -> str:
    """``sofia xmlstatus``: one profile, as in the identity capture."""
    return identity_answers()[0]


def _sofia_registrations(rows: list[dict[str, str]]) -> str:
    """``sofia xmlstatus profile internal reg``, written the way mod_sofia writes it."""
    lines = ['<?xml version="1.0" encoding="ISO-8859-1"?>', "<profile>", "  <registrations>"]
    for row in rows:
        if row.get("_flushed"):
            continue
        contact = row["url"].split("/", 2)[2]
        lines += [
            "    <registration>",
            f"        <call-id>{row['token']}</call-id>",
            f"        <user>{row['reg_user']}@{row['realm']}</user>",
            f"        <contact>&quot;&quot; &lt;{contact}&gt;</contact>",
            "        <agent>SIPp-test</agent>",
            "        <status>Registered(UDP)(unknown) exp(2026-12-03 09:59:38) expsecs(57)</status>",
            f"        <network-ip>{row['network_ip']}</network-ip>",
            f"        <network-port>{row['network_port']}</network-port>",
            f"        <sip-auth-user>{row['_auth_user']}</sip-auth-user>",
            "    </registration>",
        ]
    lines += ["  </registrations>", "</profile>", ""]
    return "\n".join(lines)


# --- the outbound socket (FreeSWITCH's socket application) ----------------------------------------


class FakeSocketCall(threading.Thread):
    """FreeSWITCH running ``socket 127.0.0.1:PORT async full`` for one channel.

    It connects, waits for ``connect``, answers with CHANNEL_DATA, then answers every command the
    way mod_event_socket does until ``exit`` or the bridge closes the socket. ``commands`` records
    what the bridge sent.
    """

    def __init__(
        self,
        port: int,
        data: bytes,
        *,
        answer: bool = True,
        timeout: float = 10.0,
        close_after: str | None = None,
    ) -> None:
        super().__init__(name="fake-socket-call", daemon=True)
        self.port = port
        self.data = data
        self.answer = answer
        self.timeout = timeout
        # Close the socket once a command starting with this came in, unanswered: what FreeSWITCH
        # does when the channel goes away (killed over ESL at the same moment, or hung up).
        self.close_after = close_after
        self.commands: list[str] = []
        self.error: str | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        """Talk to the bridge like the socket application would."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
                self._talk(sock)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished.set()

    def _talk(self, sock: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\n\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return  # the bridge closed the socket
                buffer += chunk
            raw, buffer = buffer.split(b"\n\n", 1)
            command = raw.decode()
            self.commands.append(command)
            if self.close_after is not None and command.startswith(self.close_after):
                return
            if not self.answer:
                continue
            if command == "connect":
                sock.sendall(self.data)
            elif command == "exit":
                sock.sendall(reply("+OK bye") + DISCONNECT_NOTICE)
                return
            elif command.startswith("api "):
                sock.sendall(api_response("+OK\n"))
            else:
                sock.sendall(reply("+OK"))
