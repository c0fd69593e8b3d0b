"""Peers that go away at the worst moment: the bridge reconnects and then equals what the PBX shows.

Exact moments (a cut in the middle of a frame, of a resync's list, of a storm) need the fakes,
which speak the real bytes. Afterwards the state must equal the PBX's tables, no log-on may hold
a licence twice, no task or connection may be left behind, and the reconnects must back off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from forum_bridge.adapters.asterisk.ami import AmiListener
from forum_bridge.service import BridgeService
from tests.asterisk.conftest import AmiRig, ami, bridge_settings, contact_item, contact_status, new_channel
from tests.asterisk.fake_ami import FakeAmi, Session, render
from tests.freeswitch.conftest import fake_esl, fs_settings, start_bridge, wait_until
from tests.freeswitch.fake_esl import FakeEslServer, event_frame, register_event

__all__ = ["ami", "bridge_settings", "fake_esl", "fs_settings", "start_bridge"]  # fixtures, re-used

PHONES = ["21-desk", "22-soft", "23-desk", "24-desk"]


def view(service: BridgeService) -> tuple[dict[str, str], list[str], list[str]]:
    """(state of each log-on, the licence holders, the calls) as the bridge sees them."""
    status = service.status()
    holders = [a["logon"] for a in status["assignments"]]
    assert len(holders) == len(set(holders)), f"a log-on holds two licences: {holders}"
    assert status["licences"]["used"] <= status["licences"]["total"]
    return (
        {s["logon"]: s["state"] for s in status["subscribers"]},
        sorted(holders),
        sorted(c["channel"] for c in status["calls"]),
    )


def expected_states(contacts: list[dict[str, str]]) -> dict[str, str]:
    registered = {c["Endpoint"] for c in contacts}
    return {p: "logged_on" if p in registered else "logged_off" for p in PHONES}


class CuttingAmi(FakeAmi):
    """A fake AMI that can drop the connection half-way through the answer to one list action."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cut_list: str | None = None  # "ContactList": cut the next PJSIPShowContacts answer

    @staticmethod
    def _list(
        session: Session,
        head: dict[str, str],
        names: tuple[str, str],
        rows: list[dict[str, str]],
        message: str,
        empty_error: str,
    ) -> None:
        owner: CuttingAmi = session.owner  # type: ignore[attr-defined]
        if owner.cut_list != names[0] or not rows:
            FakeAmi._list(session, head, names, rows, message, empty_error)
            return
        owner.cut_list = None
        out = [render({"Response": "Success", **head, "EventList": "start", "Message": message})]
        out.extend(render({"Event": names[0], **head, **row}) for row in rows[: len(rows) // 2])
        data = b"".join(out)
        session.send(data[: len(data) - 7])  # and the last item is cut in the middle
        session.writer.transport.abort()

    async def _dispatch(self, session: Session, action: dict[str, str]) -> bool:
        session.owner = self  # type: ignore[attr-defined]
        return await super()._dispatch(session, action)


async def settled(listener: AmiListener, fake: FakeAmi, logins: int) -> None:
    """Wait until the listener logged in ``logins`` times and applied every frame it received."""
    await listener.wait_until(lambda: listener.logins >= logins and listener.resyncs >= logins, 15)
    await listener.caught_up(10)


def test_ami_cut_in_the_middle_of_a_frame(ami: AmiRig) -> None:
    fake = ami.use_fake(CuttingAmi())
    service = ami.setup(*PHONES, **{"licences.count": 2})
    fake.contacts = [contact_item("21-desk", 5081), contact_item("22-soft", 5082)]

    async def scenario() -> None:
        async with ami.listening(resynced=False) as listener:
            await settled(listener, fake, 1)
            assert service.authorize("21-desk", "600").allowed
            frame = render(contact_status("23-desk", port=5083))
            fake.push_bytes(frame[: len(frame) // 2])
            await asyncio.sleep(0)
            fake.contacts = [contact_item("21-desk", 5081), contact_item("24-desk", 5084)]
            await fake.drop()
            await settled(listener, fake, 2)
            states, holders, _calls = view(service)
            assert states == expected_states(fake.contacts)
            assert holders == ["21-desk"]

    ami.run(scenario())


def test_ami_cut_in_the_middle_of_the_resync(ami: AmiRig) -> None:
    fake = ami.use_fake(CuttingAmi())
    service = ami.setup(*PHONES, **{"licences.count": 2})
    fake.contacts = [contact_item(p, 5081 + i) for i, p in enumerate(PHONES[:3])]
    fake.cut_list = "ContactList"  # the first login's resync dies half-way

    async def scenario() -> None:
        async with ami.listening(resynced=False) as listener:
            await ami.wait(lambda: listener.logins >= 2 and listener.resyncs >= 1, 15)
            await listener.caught_up(10)
            assert listener.logins == 2 and listener.resyncs == 1  # the cut one never counted
            states, holders, _calls = view(service)
            assert states == expected_states(fake.contacts)
            assert holders == []

    ami.run(scenario())


def test_ami_cut_during_a_storm_leaves_no_leak_and_no_double_holding(ami: AmiRig) -> None:
    fake = ami.use_fake(CuttingAmi())
    service = ami.setup(*PHONES, registered=True, **{"licences.count": 2})

    async def scenario() -> None:
        async with ami.listening(resynced=False) as listener:
            await settled(listener, fake, 1)
            tasks_before = len(asyncio.all_tasks())
            for round_ in range(3):
                storm: list[Mapping[str, str]] = []
                for i in range(300):
                    phone = PHONES[i % len(PHONES)]
                    storm.append(contact_status(phone, "Reachable", 5081 + PHONES.index(phone)))
                    channel = new_channel(phone, "600")
                    storm.append(channel)
                    fake.channels.append(channel)
                fake.push_bytes(b"".join(render(f) for f in storm))
                await asyncio.sleep(0.05)
                fake.contacts = [contact_item(p, 5081 + i) for i, p in enumerate(PHONES) if i != round_]
                fake.channels = fake.channels[-2:]
                await fake.drop()
                await settled(listener, fake, 2 + round_)
                states, holders, calls = view(service)
                assert states == expected_states(fake.contacts)
                assert len(holders) <= 2
                assert set(calls) <= {c["Channel"] for c in fake.channels}
                assert len(fake.sessions) == 1  # the old connection is gone, one new one
            await listener.caught_up(10)
            assert len(asyncio.all_tasks()) <= tasks_before + 1
            assert len(listener._tasks) <= 2

    ami.run(scenario(), timeout=60)


def test_ami_reconnects_back_off(ami: AmiRig) -> None:
    ami.setup(**{"asterisk.reconnect_max": 1.0})
    fake = ami.fake

    async def scenario(listener: AmiListener) -> None:
        await fake.stop_listening()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ami.wait(lambda: listener._failures >= 6, 20)
        # 0.02 + 0.04 + ... + 0.32 s between the first six attempts (without backoff: 0.12 s).
        assert loop.time() - started >= 0.5
        await fake.start()
        await ami.wait(lambda: listener.resyncs >= 2, 10)

    ami.listen(scenario)


# --- FreeSWITCH ------------------------------------------------------------------------------------


def test_esl_dropped_in_the_middle_of_a_frame(
    start_bridge: Callable[..., Any], fake_esl: FakeEslServer
) -> None:
    fake_esl.add_registration("1000", 5091)
    fake_esl.add_registration("1001", 5092)
    bridge = start_bridge()
    wait_until(lambda: bridge.subscriber("1001")["state"] == "logged_on", what="the first resync")
    sessions = bridge.listener.sessions
    frame = event_frame(register_event("1002", 5093))
    fake_esl.send_raw(frame[: len(frame) // 2])
    fake_esl.remove_registration("1001", 5092)
    fake_esl.add_registration("1003", 5094)
    fake_esl.drop()
    wait_until(lambda: bridge.listener.sessions > sessions and bridge.listener.connected, 10, "the reconnect")
    states = {s["logon"]: s["state"] for s in bridge.service.status()["subscribers"]}
    assert states == {"1000": "logged_on", "1001": "logged_off", "1002": "logged_off", "1003": "logged_on"}
    assert len(fake_esl.live) == 1


@pytest.mark.parametrize("cut", ["sofia xmlstatus profile internal reg", "show channels as json"])
def test_esl_dropped_in_the_middle_of_the_resync(
    start_bridge: Callable[..., Any], fake_esl: FakeEslServer, cut: str
) -> None:
    fake_esl.add_registration("1000", 5091)
    fake_esl.drop_on = f"api {cut}"
    bridge = start_bridge()
    wait_until(lambda: bridge.subscriber("1000")["state"] == "logged_on", 10, "the resync after the cut")
    assert fake_esl.accepted >= 2


class BootingAmi(FakeAmi):
    """Asterisk right after a restart: AMI answers before res_pjsip is loaded."""

    def __init__(self, unknown_for: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unknown_for = unknown_for

    async def _dispatch(self, session: Session, action: dict[str, str]) -> bool:
        if action.get("Action", "").lower() == "pjsipshowcontacts" and self.unknown_for > 0:
            self.unknown_for -= 1
            self.actions.append(action)
            head = {"ActionID": action["ActionID"]} if "ActionID" in action else {}
            message = "Invalid/unknown command: PJSIPShowContacts. Use Action: ListCommands to show available commands."
            session.send(render({"Response": "Error", **head, "Message": message}))
            return True
        return await super()._dispatch(session, action)


def test_a_booting_asterisk_without_pjsip_yet_is_retried_without_blaming_the_ami_user(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    ami.use_fake(BootingAmi(unknown_for=2))
    service = ami.setup("21-desk", registered=True, **{"asterisk.reconnect_max": 0.2})

    async def scenario() -> None:
        async with ami.listening(resynced=False) as listener:
            await ami.wait(lambda: listener.resyncs >= 1, 15)
            assert listener.logins == 1  # the session was kept
            states, _holders, _calls = view(service)
            assert states["21-desk"] == "logged_on"

    with caplog.at_level(logging.WARNING, logger="forum_bridge"):
        ami.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot resync yet" in r.getMessage() for r in caplog.records)
