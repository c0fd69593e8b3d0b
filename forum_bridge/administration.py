"""Administration: subscribers (add, remove, reserve, CSV import), profiles, resetting licences.

Also the checks every name and number passes on the way in (:func:`validate_logon`,
:func:`validate_number`): bad input is a clear one-line error and changes nothing.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

from sqlalchemy import select

from forum_bridge.clocks import Clock
from forum_bridge.config import Settings
from forum_bridge.core.names import invisible_character
from forum_bridge.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import ProfileRow, SubscriberRow

# The service's logger: operators filter the bridge's own lines by it.
service_log = logging.getLogger("forum_bridge.service")

MAX_NAME = 128
MAX_NUMBER = 64
RESERVED_WORDS = {
    "reserved": True,
    "yes": True,
    "true": True,
    "1": True,
    "no": False,
    "false": False,
    "0": False,
}


def validate_logon(logon: str) -> str:
    """A log-on name: SIP user part characters, nothing invisible, at most 128 characters.

    A name with an invisible character (a spreadsheet's byte order mark, a zero-width space) would
    look like another log-on's name and never match what the PBX reports, so the phone would be
    treated as unmanaged: refused, never stored.
    """
    value = logon.strip()
    hidden = invisible_character(value)
    if hidden is not None:
        raise InvalidInputError(
            f"invalid log-on {logon!r}: it holds an invisible or control character ({hidden})"
        )
    if not value or len(value) > MAX_NAME or any(c in "/,;:@<>\"'" for c in value):
        raise InvalidInputError(f"invalid log-on {logon!r}: use a SIP user name without spaces or / , ; : @")
    return value


def validate_number(number: str) -> str:
    """A call number: the ASCII digits and * # +, at most 64 characters (no other script's digits)."""
    value = number.strip()
    if not value or len(value) > MAX_NUMBER or not all(c in "0123456789*#+" for c in value):
        raise InvalidInputError(f"invalid call number {number!r}: use digits, * # or +")
    return value


class Administration:
    """Changes to what the bridge manages, each in one transaction, audited as this node's."""

    def __init__(self, database: Database, settings: Settings, clock: Clock) -> None:
        """Works on ``database``; new subscribers get ``settings.default_profile`` unless told."""
        self.database = database
        self.settings = settings
        self.node = settings.node_name
        self.clock = clock

    def warn_about_hidden_names(self) -> None:
        """Warn of every stored log-on that holds an invisible character (it matches no phone)."""
        # Names stored before invisible characters were refused (a CSV's byte order mark) never
        # match what the PBX reports, so those phones run unmanaged: say so until they are fixed.
        with self.database.transaction() as session:
            hidden = [n for n in session.scalars(select(SubscriberRow.logon)) if invisible_character(n)]
        for logon in hidden:
            service_log.warning(
                "subscriber %r holds an invisible character (%s) and matches no phone: remove it "
                "('forum-bridge subscriber remove') and add it again",
                logon,
                invisible_character(logon),
            )

    def reset_licences(self, actor: str) -> int:
        """Free every licence now; calls in progress go on and take a licence at their next connection."""
        with self.database.transaction() as session:
            freed = ops.reset_licences(session, self.clock(), actor, self.node)
        service_log.warning("licences reset by %s: %d freed node=%s", actor, len(freed), self.node)
        return len(freed)

    def add_subscriber(
        self, logon: str, number: str, profile: str | None = None, *, reserved: bool = False
    ) -> None:
        """Provision a log-on with its call number; ``reserved`` keeps a licence for it."""
        logon, number = validate_logon(logon), validate_number(number)
        profile = profile or self.settings.default_profile
        with self.database.transaction() as session:
            if session.get(ProfileRow, profile) is None:
                raise NotFoundError(
                    f"no profile named {profile!r}; create it with 'forum-bridge profile set'"
                )
            if session.get(SubscriberRow, logon) is not None:
                raise AlreadyExistsError(f"subscriber {logon!r} exists already")
            if reserved:
                ops.lock_pool(session)
                ops.check_reservations(session, extra=1)
                ops.mark_pool_changed(session)
                ops.audit(session, self.clock(), "reserve", logon=logon, node=self.node)
            session.add(
                SubscriberRow(
                    logon=logon,
                    number=number,
                    profile=profile,
                    last_logon_failed=False,
                    created_at=self.clock(),
                    reserved=reserved,
                )
            )

    def set_reserved(self, logon: str, reserved: bool) -> bool:
        """Reserve a licence for ``logon`` or give it back to the floating pool.

        Returns False when it was so already. A licence the log-on holds now stays with it. More
        reservations than purchased licences is an :class:`InvalidInputError` and changes nothing.
        """
        with self.database.transaction() as session:
            changed = ops.set_reserved(session, logon, reserved)
            if changed:
                ops.audit(
                    session, self.clock(), "reserve" if reserved else "unreserve", logon=logon, node=self.node
                )
        if changed:
            service_log.info(
                "licence %s logon=%s node=%s", "reserved" if reserved else "unreserved", logon, self.node
            )
        return changed

    def remove_subscriber(self, logon: str) -> None:
        """Stop managing a log-on; its licence is freed (reason: removal)."""
        with self.database.transaction() as session:
            row = session.get(SubscriberRow, logon)
            if row is None:
                raise NotFoundError(f"no subscriber {logon!r}")
            if row.reserved:
                ops.lock_pool(session)  # one reservation fewer: the pool's row is recounted at commit
            ops.release(session, logon, self.clock(), "removal", self.node)
            session.delete(row)

    def import_subscribers(self, text: str) -> int:
        """Import ``logon,number[,profile[,reserved]]`` CSV rows in one transaction: all or nothing."""
        rows: list[tuple[str, str, str]] = []
        reserve: set[str] = set()
        seen: set[str] = set()
        # Spreadsheet programs start UTF-8 files with a byte order mark; it is not part of a name.
        text = text.removeprefix("\ufeff")
        for lineno, fields_ in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not fields_ or all(not f.strip() for f in fields_) or fields_[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and [f.strip().lower() for f in fields_[:2]] == ["logon", "number"]:
                continue  # a header line
            if len(fields_) not in (2, 3, 4):
                raise InvalidInputError(
                    f"line {lineno}: expected logon,number[,profile[,reserved]], got {len(fields_)} fields"
                )
            try:
                logon, number = validate_logon(fields_[0]), validate_number(fields_[1])
            except InvalidInputError as exc:
                raise InvalidInputError(f"line {lineno}: {exc}") from exc
            if logon in seen:
                raise InvalidInputError(f"line {lineno}: log-on {logon!r} appears twice")
            seen.add(logon)
            profile = (
                fields_[2].strip()
                if len(fields_) >= 3 and fields_[2].strip()
                else self.settings.default_profile
            )
            flag = fields_[3].strip().lower() if len(fields_) == 4 else ""
            if flag and flag not in RESERVED_WORDS:
                raise InvalidInputError(
                    f"line {lineno}: reserved must be yes or no, got {fields_[3].strip()!r}"
                )
            if RESERVED_WORDS.get(flag, False):
                reserve.add(logon)
            rows.append((logon, number, profile))
        now = self.clock()
        with self.database.transaction() as session:
            profiles = set(session.scalars(select(ProfileRow.name)))
            existing = set(session.scalars(select(SubscriberRow.logon).where(SubscriberRow.logon.in_(seen))))
            for logon, _number, profile in rows:
                if profile not in profiles:
                    raise NotFoundError(f"log-on {logon!r}: no profile named {profile!r}")
                if logon in existing:
                    raise AlreadyExistsError(f"subscriber {logon!r} exists already")
            if reserve:
                ops.lock_pool(session)
                ops.check_reservations(session, extra=len(reserve))
                ops.mark_pool_changed(session)
                for logon in sorted(reserve):
                    ops.audit(session, now, "reserve", logon=logon, node=self.node, detail="import")
            session.add_all(
                SubscriberRow(
                    logon=logon,
                    number=number,
                    profile=profile,
                    last_logon_failed=False,
                    created_at=now,
                    reserved=logon in reserve,
                )
                for logon, number, profile in rows
            )
        return len(rows)

    def set_profile(self, name: str, keepalive: int) -> None:
        """Create or change a profile's keepalive interval (seconds)."""
        name = name.strip()
        if not name or len(name) > 64 or invisible_character(name) is not None:
            raise InvalidInputError(f"invalid profile name {name!r}")
        if keepalive < 1:
            raise InvalidInputError(f"keepalive must be at least 1 second, got {keepalive}")
        with self.database.transaction() as session:
            ops.upsert_profiles(session, [(name, keepalive)])

    def profiles(self) -> list[dict[str, Any]]:
        """Every profile with its keepalive and how many subscribers use it."""
        with self.database.read() as session:
            users: dict[str, int] = {}
            for profile in session.scalars(select(SubscriberRow.profile)):
                users[profile] = users.get(profile, 0) + 1
            return [
                {"name": row.name, "keepalive": row.keepalive_seconds, "subscribers": users.get(row.name, 0)}
                for row in session.scalars(select(ProfileRow).order_by(ProfileRow.name))
            ]
