"""Read the recorded AMI transcripts in ``fixtures/`` as frames."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
BANNER_PREFIX = "Asterisk Call Manager/"


def raw_frames(name: str) -> list[str]:
    """The frames of a transcript as text blocks (without the banner), lines joined by ``\\r\\n``."""
    text = (FIXTURES / name).read_text(encoding="utf-8").replace("\r\n", "\n")
    frames: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.startswith(BANNER_PREFIX):
            continue
        if line.strip() == "":
            if current:
                frames.append("\r\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        frames.append("\r\n".join(current))
    return frames


def parse_frame(block: str) -> dict[str, str]:
    """One frame as a dict (header case kept; the first of repeated headers wins)."""
    headers: dict[str, str] = {}
    for line in block.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip(), value[1:] if value.startswith(" ") else value)
    return headers


def frames(name: str) -> list[dict[str, str]]:
    """Every frame of a transcript, parsed."""
    return [parse_frame(block) for block in raw_frames(name)]


def events(name: str, *kinds: str) -> list[dict[str, str]]:
    """The event frames of a transcript (only the given event names, if any)."""
    return [f for f in frames(name) if "Event" in f and (not kinds or f["Event"] in kinds)]
