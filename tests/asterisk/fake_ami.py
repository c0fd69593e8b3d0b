"""A fake Asterisk Manager Interface that speaks the real bytes, for what a real Asterisk cannot do
on demand: malformed frames, storms, a dropped connection at an exact moment, a silent peer.

Framing as Asterisk 22 writes it (``main/manager.c``; checked against the recorded transcripts):
the banner ``Asterisk Call Manager/11.0.0``, CRLF line ends, a frame ends with an empty line. Login
answers ``Success``/``Authentication accepted`` followed by ``FullyBooted``, or ``Error``/
``Authentication failed`` and the connection is closed. The list actions answer from the fake's
state exactly like Asterisk does (``No Contacts found`` is an Error, not an empty list).

The ``Filter`` action is acknowledged and recorded per session as Asterisk does (legacy filters: a
POSIX regex over the whole event, ``!`` in front for an exclude filter); events are filtered by it
only with ``filtering=True``, so that tests of malformed frames still get them through.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

BANNER = "Asterisk Call Manager/11.0.0"
CRLF = "\r\n"


def render(frame: Mapping[str, str]) -> bytes:
    """One frame on the wire."""
    return ("".join(f"{k}: {v}{CRLF}" for k, v in frame.items()) + CRLF).encode("utf-8")


@dataclass
class Session:
    """One client connection."""

    writer: asyncio.StreamWriter
    logged_in: bool = False
    actions: list[dict[str, str]] = field(default_factory=list)
    includes: list[re.Pattern[bytes]] = field(default_factory=list)
    excludes: list[re.Pattern[bytes]] = field(default_factory=list)

    def wants(self, frame: bytes) -> bool:
        """Asterisk's should_send_event: includes first (if any), then excludes."""
        if self.includes and not any(p.search(frame) for p in self.includes):
            return False
        return not any(p.search(frame) for p in self.excludes)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class FakeAmi:
    """An AMI server on 127.0.0.1 (port 0 = a free port) with contacts and channels you set."""

    def __init__(
        self,
        *,
        username: str = "forumbridge",
        secret: str = "fake-ami-secret",
        port: int = 0,
        filtering: bool = False,
    ):
        self.username = username
        self.filtering = filtering
        self.secret = secret
        self.port = port
        self.contacts: list[dict[str, str]] = []
        self.channels: list[dict[str, str]] = []
        self.actions: list[dict[str, str]] = []
        self.login_attempts = 0
        self.logins = 0
        self.answer_pings = True
        self.refused_actions: set[str] = set()  # lower-case names answered "Permission denied"
        self.login_error: str | None = None  # e.g. "Asterisk is shutting down": refuse every login
        self.sessions: list[Session] = []
        # AstDB as full keys ("/family/key") and the loaded modules (None: every module is loaded).
        self.astdb: dict[str, str] = {}
        self.modules: set[str] | None = None
        self.endpoints: set[str] = set()  # endpoints PJSIPShowEndpoint knows besides those with contacts
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (again, on the same port after :meth:`stop_listening`)."""
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop_listening(self) -> None:
        """Asterisk goes away: stop accepting and drop every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop()

    async def drop(self) -> None:
        """Drop every client connection at once (no goodbye)."""
        for session in list(self.sessions):
            transport = session.writer.transport
            transport.abort()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 2.0)

    async def close(self) -> None:
        """Stop everything."""
        await self.stop_listening()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- what tests do ---------------------------------------------------------------------------

    def push(self, frame: Mapping[str, str] | str) -> None:
        """Send an event (a mapping, or raw frame text with CRLF or LF lines) to every logged-in client."""
        if isinstance(frame, str):
            text = frame.replace("\r\n", "\n").strip("\n").replace("\n", CRLF) + CRLF + CRLF
            data = text.encode("utf-8")
        else:
            data = render(frame)
        self.push_bytes(data)

    def push_bytes(self, data: bytes) -> int:
        """Send raw bytes to every logged-in client; the frames sent to the last one (filters applied)."""
        sent = 0
        for session in self.sessions:
            if not session.logged_in:
                continue
            if self.filtering and (session.includes or session.excludes):
                frames = [f + b"\r\n\r\n" for f in data.split(b"\r\n\r\n") if f]
                kept = [f for f in frames if session.wants(f)]
                session.send(b"".join(kept))
                sent = len(kept)
            else:
                session.send(data)
                sent = data.count(b"\r\n\r\n")
        return sent

    @property
    def hangups(self) -> list[dict[str, str]]:
        """Every Hangup action received."""
        return [a for a in self.actions if a.get("Action", "").lower() == "hangup"]

    def actions_named(self, name: str) -> list[dict[str, str]]:
        """Every action of that name received."""
        return [a for a in self.actions if a.get("Action", "").lower() == name.lower()]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds after some action or connection change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- the protocol ----------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        session = Session(writer)
        self.sessions.append(session)
        self._notify()
        try:
            session.send((BANNER + CRLF).encode())
            buffer = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    block, buffer = buffer.split(b"\r\n\r\n", 1)
                    action = self._parse(block)
                    if action and not await self._dispatch(session, action):
                        return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.sessions.remove(session)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)  # type: ignore[arg-type]
            self._notify()

    @staticmethod
    def _parse(block: bytes) -> dict[str, str]:
        action: dict[str, str] = {}
        for line in block.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                action[name.strip()] = value.strip()
        return action

    async def _dispatch(self, session: Session, action: dict[str, str]) -> bool:
        """Answer one action; False ends the session."""
        name = action.get("Action", "").lower()
        action_id = action.get("ActionID", "")
        head = {"ActionID": action_id} if action_id else {}
        session.actions.append(action)
        self.actions.append(action)
        self._notify()
        if name == "login":
            self.login_attempts += 1
            refusal = self.login_error
            if action.get("Username") != self.username or action.get("Secret") != self.secret:
                refusal = "Authentication failed"
            if refusal:
                session.send(render({"Response": "Error", **head, "Message": refusal}))
                await session.writer.drain()
                return False
            session.logged_in = True
            self.logins += 1
            session.send(render({"Response": "Success", **head, "Message": "Authentication accepted"}))
            mask = action.get("Events", "on").lower()
            if mask in ("on", "yes") or "system" in mask.split(","):
                session.send(
                    render(
                        {
                            "Event": "FullyBooted",
                            "Privilege": "system,all",
                            "Uptime": "5",
                            "LastReload": "5",
                            "Status": "Fully Booted",
                        }
                    )
                )
            self._notify()
            return True
        if not session.logged_in:
            session.send(render({"Response": "Error", **head, "Message": "Permission denied"}))
            return True
        if name in self.refused_actions:
            session.send(render({"Response": "Error", **head, "Message": "Permission denied"}))
        elif name == "ping":
            if self.answer_pings:
                session.send(
                    render({"Response": "Success", **head, "Ping": "Pong", "Timestamp": "1795497078.172800"})
                )
        elif name == "pjsipshowcontacts":
            self._list(
                session,
                head,
                ("ContactList", "ContactListComplete"),
                self.contacts,
                "A listing of Contacts follows, presented as ContactList events",
                "No Contacts found",
            )
        elif name == "pjsipshowendpoint":
            self._show_endpoint(session, head, action.get("Endpoint", ""))
        elif name == "coreshowchannels":
            self._list(
                session,
                head,
                ("CoreShowChannel", "CoreShowChannelsComplete"),
                self.channels,
                "Channels will follow",
                "",
            )
        elif name == "hangup":
            channel = action.get("Channel", "")
            known = [c for c in self.channels if c.get("Channel") == channel]
            if known:
                self.channels = [c for c in self.channels if c.get("Channel") != channel]
                session.send(render({"Response": "Success", **head, "Message": "Channel Hungup"}))
            else:
                session.send(render({"Response": "Error", **head, "Message": "No such channel"}))
        elif name == "filter" and action.get("Operation", "").lower() == "add":
            pattern = action.get("Filter", "")
            target = session.excludes if pattern.startswith("!") else session.includes
            # POSIX classes Asterisk's regcomp knows, in Python's spelling.
            target.append(re.compile(pattern.removeprefix("!").replace("[[:space:]]", r"\s").encode()))
            session.send(render({"Response": "Success", **head, "Message": "Success"}))
        elif name in ("dbput", "dbdel", "dbdeltree", "dbgettree", "modulecheck"):
            self._astdb_action(session, head, name, action)
        elif name == "logoff":
            session.send(render({"Response": "Goodbye", **head, "Message": "Thanks for all the fish."}))
            return False
        else:
            session.send(
                render(
                    {
                        "Response": "Error",
                        **head,
                        "Message": f"Invalid/unknown command: {action.get('Action')}",
                    }
                )
            )
        return True

    def _show_endpoint(self, session: Session, head: dict[str, str], endpoint: str) -> None:
        """PJSIPShowEndpoint as res_pjsip answers it: the endpoint, then one ContactStatusDetail per
        contact (from the ``contacts`` set for PJSIPShowContacts: its Uri and ExpirationTime)."""
        known = endpoint in self.endpoints or any(c.get("Endpoint") == endpoint for c in self.contacts)
        if not endpoint or not known:
            session.send(
                render({"Response": "Error", **head, "Message": f"Unable to retrieve endpoint {endpoint}"})
            )
            return
        rows = [{"ObjectType": "endpoint", "ObjectName": endpoint, "Event": "EndpointDetail"}]
        for contact in self.contacts:
            if contact.get("Endpoint") == endpoint:
                rows.append(
                    {
                        "Event": "ContactStatusDetail",
                        "AOR": endpoint,
                        "URI": contact.get("Uri", ""),
                        "UserAgent": contact.get("UserAgent", ""),
                        "RegExpire": contact.get("ExpirationTime", ""),
                        "CallID": contact.get("CallId", ""),
                        "Status": contact.get("Status", ""),
                        "EndpointName": endpoint,
                    }
                )
        message = "Following are Events for each object associated with the Endpoint"
        out = [render({"Response": "Success", **head, "EventList": "start", "Message": message})]
        out.extend(render({"Event": row.pop("Event"), **head, **row}) for row in rows)
        complete = {"Event": "EndpointDetailComplete", **head, "EventList": "Complete"}
        out.append(render({**complete, "ListItems": str(len(rows))}))
        session.send(b"".join(out))

    def _astdb_action(
        self, session: Session, head: dict[str, str], name: str, action: dict[str, str]
    ) -> None:
        """AstDB and ModuleCheck as main/db.c and main/manager.c answer them."""
        family, key = action.get("Family", ""), action.get("Key", "")
        full = f"/{family}/{key}"
        if name == "modulecheck":
            module = action.get("Module", "").removesuffix(".so")
            if self.modules is None or module in self.modules:
                session.send(render({"Response": "Success", **head, "Version": ""}))
            else:
                session.send(render({"Response": "Error", **head, "Message": "Module not loaded"}))
        elif name == "dbput":
            self.astdb[full] = action.get("Val", "")
            session.send(render({"Response": "Success", **head, "Message": "Updated database successfully"}))
        elif name == "dbdel":
            if self.astdb.pop(full, None) is None:
                message = "Database entry could not be deleted"
                session.send(render({"Response": "Error", **head, "Message": message}))
            else:
                session.send(render({"Response": "Success", **head, "Message": "Key deleted successfully"}))
        elif name == "dbdeltree":
            prefix = f"/{family}/{key}/" if key else f"/{family}/"
            gone = [k for k in self.astdb if k.startswith(prefix)]
            for k in gone:
                del self.astdb[k]
            if gone:
                session.send(
                    render({"Response": "Success", **head, "Message": "Key tree deleted successfully"})
                )
            else:
                session.send(render({"Response": "Error", **head, "Message": "Database entry not found"}))
        else:
            prefix = f"/{family}/{key}/" if key else f"/{family}/"
            rows = [{"Key": k, "Val": v} for k, v in sorted(self.astdb.items()) if k.startswith(prefix)]
            self._list(
                session, head, ("DBGetTreeResponse", "DBGetTreeComplete"), rows, "Result will follow", ""
            )
        self._notify()

    @staticmethod
    def _list(
        session: Session,
        head: dict[str, str],
        names: tuple[str, str],
        rows: list[dict[str, str]],
        message: str,
        empty_error: str,
    ) -> None:
        if not rows and empty_error:
            session.send(render({"Response": "Error", **head, "Message": empty_error}))
            return
        item, complete = names
        out = [render({"Response": "Success", **head, "EventList": "start", "Message": message})]
        out.extend(render({"Event": item, **head, **row}) for row in rows)
        out.append(render({"Event": complete, **head, "EventList": "Complete", "ListItems": str(len(rows))}))
        session.send(b"".join(out))
