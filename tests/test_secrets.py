"""No secret ever leaves the bridge: a whole session, at DEBUG, grepped for every secret.

The AMI secret, the ESL password, the web token and the database password are set the way an
operator sets them (the environment of secrets.env), the bridge runs on a real PostgreSQL with a
password in its URL, and everything that can show text is collected: each CLI command's output and
errors, a ``forum-bridge run asterisk`` against the fake AMI (logging at DEBUG) with calls, failed
log-ons and the page used with a wrong and a right token, a ``run freeswitch`` that cannot reach
its event socket, and database URLs that are wrong in every way an operator can get them wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.asterisk.aio import run
from tests.asterisk.conftest import challenge_failed, contact_status, new_channel
from tests.asterisk.fake_ami import FakeAmi
from tests.asterisk.test_asterisk_agi import ask
from tests.conftest import PostgresServer, wait_until
from tests.sandbox.asterisk import free_tcp_port

ROOT = Path(__file__).resolve().parents[1]
AMI_SECRET = "ami-S3cret-Q7zx"
ESL_PASSWORD = "esl-P4ss-W9kd"
WEB_TOKEN = "web-T0ken-long-enough-K2"
DB_PASSWORD = "Db-Pa55-Vv8q"
SECRETS = (AMI_SECRET, ESL_PASSWORD, WEB_TOKEN, DB_PASSWORD)


def check_clean(label: str, text: str) -> None:
    """Fail naming the secret and where it showed up."""
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} appeared in {label}"
    # Pieces matter too: a URL parser may report a password's tail as a host name.
    for secret in SECRETS:
        for piece in (secret[:8], secret[-8:]):
            assert piece not in text, f"a piece of {secret!r} ({piece!r}) appeared in {label}"


class Session:
    """The configuration, environment and collected output of one bridge installation."""

    def __init__(self, tmp_path: Path, postgres: PostgresServer) -> None:
        self.tmp_path = tmp_path
        self.database = postgres.create_database("fb_secrets")
        # The test server trusts every login, so the password is carried, checked by nobody, and
        # must still show up nowhere.
        self.url = self.database.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@")
        self.web_port, self.agi_port = free_tcp_port(), free_tcp_port()
        self.config = tmp_path / "forum-bridge.toml"
        self.collected: list[tuple[str, str]] = []

    def write_config(self, ami_port: int) -> None:
        self.config.write_text(
            '[licences]\ncount = 1\n[node]\nname = "pbx1"\n[log]\nlevel = "DEBUG"\n'
            f'[web]\nhost = "127.0.0.1"\nport = {self.web_port}\n'
            f"[asterisk]\nami_port = {ami_port}\nagi_port = {self.agi_port}\nreconnect_max = 0.5\n"
            f"[freeswitch]\nesl_port = {free_tcp_port()}\nsocket_port = {free_tcp_port()}\nreconnect_max = 0.5\n",
            encoding="utf-8",
        )

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
        env.update(
            FORUM_BRIDGE_CONFIG=str(self.config),
            FORUM_BRIDGE_DATABASE_URL=self.url,
            FORUM_BRIDGE_ASTERISK_AMI_SECRET=AMI_SECRET,
            FORUM_BRIDGE_FREESWITCH_ESL_PASSWORD=ESL_PASSWORD,
            FORUM_BRIDGE_WEB_TOKEN=WEB_TOKEN,
        )
        return env

    def command(self, *args: str, expect: int | None = 0) -> str:
        result = subprocess.run(
            [sys.executable, "-c", "from forum_bridge.cli import entry; entry()", *args],
            cwd=ROOT,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = result.stdout + result.stderr
        self.collected.append((f"forum-bridge {' '.join(args)}", out))
        if expect is not None:
            assert result.returncode == expect, out
        return out

    def start(self, *args: str) -> tuple[subprocess.Popen[str], Path]:
        log = self.tmp_path / f"{'-'.join(args)}.log"
        handle = log.open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "forum_bridge", *args],
            cwd=ROOT,
            env=self.environ(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
        handle.close()
        return proc, log

    def stop(self, proc: subprocess.Popen[str], log: Path) -> str:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = log.read_text(encoding="utf-8", errors="replace")
        self.collected.append((f"the log of {log.stem}", text))
        return text


def http(
    url: str,
    *,
    method: str = "GET",
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """One request: (status, body, headers), whatever the status."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode("utf-8", "replace"), str(answer.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode("utf-8", "replace"), str(error.headers)


def test_no_secret_appears_anywhere_in_a_whole_session(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    session = Session(tmp_path, postgres_server)

    async def scenario() -> None:
        fake = FakeAmi(secret=AMI_SECRET)
        await fake.start()
        try:
            session.write_config(fake.port)
            await asyncio.to_thread(one_shot_commands, session)
            proc, log = session.start("run", "asterisk")
            try:
                await fake.wait_until(lambda: fake.logins >= 1, timeout=60)
                fake.push(contact_status("21-desk"))
                fake.push(challenge_failed("22-soft"))
                fake.push(new_channel("21-desk", "600"))
                answer = await ask(session.agi_port, "outbound", "600", channel="PJSIP/21-desk-00000009")
                assert answer["FORUM_BRIDGE_RESULT"] in ("allow", "deny")
                await asyncio.to_thread(use_the_page, session)
                await fake.drop()  # Asterisk restarts: the bridge logs in again
                await fake.wait_until(lambda: fake.logins >= 2, timeout=30)
            finally:
                text = await asyncio.to_thread(session.stop, proc, log)
            assert "level=debug" in text  # DEBUG lines were written, and checked
            # A wrong AMI secret on the PBX's side: the refusal is logged, the secret is not.
            fake.secret = "another-secret-on-the-pbx"
            proc, log = session.start("run", "asterisk")
            try:
                await fake.wait_until(lambda: fake.login_attempts >= 3, timeout=60)
            finally:
                await asyncio.to_thread(session.stop, proc, log)
        finally:
            await fake.close()

    run(scenario(), timeout=240)
    # The FreeSWITCH side, whose event socket is not there: retries are logged, the password is not.
    proc, log = session.start("run", "freeswitch")
    try:
        wait_until(lambda: "ESL" in log.read_text(errors="replace") or proc.poll() is not None, timeout=60)
    finally:
        session.stop(proc, log)
    bad_urls(session)
    assert len(session.collected) >= 20
    for label, text in session.collected:
        check_clean(label, text)


def one_shot_commands(session: Session) -> None:
    session.command("db", "upgrade")
    session.command("subscriber", "add", "21-desk", "--number", "21")
    csv_file = session.tmp_path / "phones.csv"
    csv_file.write_text("logon,number\n22-soft,22\n", encoding="utf-8-sig")
    session.command("subscriber", "import", str(csv_file))
    session.command("subscriber", "add", "bad name", "--number", "21", expect=1)
    session.command("profile", "set", "mobile", "--keepalive", "600")
    session.command("profile", "list", "--json")
    session.command("status")
    session.command("status", "--json")
    session.command("check", "21-desk", "112", "--json")
    session.command("dialplan", "asterisk")
    session.command("dialplan", "freeswitch")
    session.command("db", "current")
    session.command("db", "prune")
    session.command("--help")


def use_the_page(session: Session) -> None:
    base = f"http://127.0.0.1:{session.web_port}"
    for path in ("/", "/status.json", "/metrics", "/healthz", f"/?token={WEB_TOKEN}"):
        status, body, headers = http(base + path)
        assert status == 200, (path, status)
        session.collected.append((f"GET {path.split('?')[0]}", body + headers))
    assert json.loads(http(base + "/status.json")[1])["licences"]["total"] == 1
    wrong = http(
        base + "/reset",
        method="POST",
        headers={"Authorization": "Bearer wrong-token-of-some-length", "Accept": "application/json"},
    )
    assert wrong[0] == 403
    right = http(
        base + "/reset",
        method="POST",
        headers={"Authorization": f"Bearer {WEB_TOKEN}", "Accept": "application/json"},
    )
    assert right[0] == 200, right
    session.collected += [
        ("a wrong token's answer", "".join(wrong[1:])),
        ("a right token's answer", "".join(right[1:])),
    ]
    session.command("audit", "--json")
    session.command("licences", "reset", "--yes")


def bad_urls(session: Session) -> None:
    port = free_tcp_port()
    for url, code in (
        (f"postgresql://postgres:Xy@{DB_PASSWORD}@127.0.0.1:{port}/fb", 2),  # an unescaped "@"
        (f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:not-a-port/fb", 2),
        (f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{port}/fb", 1),  # nobody listens
        (f"postgresql://postgres:{DB_PASSWORD}/x@127.0.0.1:{port}/fb", 1),  # an unescaped "/"
        (f"mysql://root:{DB_PASSWORD}@127.0.0.1/fb", 2),
        (f"postgresql://postgres:{DB_PASSWORD}", 2),  # no "@": the password reads as a port
    ):
        for command in (["status"], ["db", "upgrade"], ["run", "asterisk"]):
            # A URL that cannot be right: exit code 2 everywhere; one that names a database
            # nobody answers for: 1 from a one-shot command, 2 from run (it cannot start).
            expected = 2 if code == 2 or command[0] == "run" else 1
            out = session.command("--database", url, *command, expect=expected)
            assert "Traceback" not in out, out
            # One line says what is wrong (run logs at DEBUG here, so other lines come too).
            errors = [line for line in out.splitlines() if "level=error" in line or line.startswith("Error:")]
            assert len(errors) == 1, out
            assert command[0] == "run" or out.strip() == errors[0], out
