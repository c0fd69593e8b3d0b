"""Which dialled numbers are emergency calls.

A number is an emergency call when, after stripping the outside-line prefix (if configured and
present), it is in the configured list or is an emergency number of the configured country according
to libphonenumber's short-number data. Only exact matches count: ``1120`` is not ``112``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# libphonenumber is imported where a region is used: its import alone is a good part of the time
# a short command such as ``forum-bridge status`` takes, and most installations list numbers.


def region_is_known(region: str) -> bool:
    """True when libphonenumber has short-number data (emergency numbers) for ``region``."""
    from phonenumbers import SUPPORTED_SHORT_REGIONS

    return region.upper() in SUPPORTED_SHORT_REGIONS


@dataclass(frozen=True)
class EmergencyNumbers:
    """The emergency numbers of one installation."""

    numbers: frozenset[str] = frozenset({"110", "112"})
    region: str = ""
    outside_line_prefix: str = ""

    @classmethod
    def of(cls, numbers: Iterable[str], region: str = "", outside_line_prefix: str = "") -> EmergencyNumbers:
        """Build the set from configuration values."""
        return cls(frozenset(n.strip() for n in numbers if n.strip()), region.upper(), outside_line_prefix)

    def _candidates(self, dialled: str) -> list[str]:
        number = dialled.strip()
        candidates = [number]
        prefix = self.outside_line_prefix
        if prefix and number.startswith(prefix) and len(number) > len(prefix):
            candidates.append(number[len(prefix) :])
        return candidates

    def is_emergency(self, dialled: str) -> bool:
        """True when ``dialled`` (as the phone sent it) reaches an emergency service."""
        if self.region:
            from phonenumbers.shortnumberinfo import is_emergency_number
        for candidate in self._candidates(dialled):
            if candidate in self.numbers:
                return True
            if self.region and candidate.isdigit() and is_emergency_number(candidate, self.region):
                return True
        return False

    def all_numbers(self) -> list[str]:
        """Every dialable emergency number, with and without the outside-line prefix.

        The dialplan snippets use this list to let emergency calls pass when the bridge is down,
        so it includes the country's numbers from libphonenumber when a region is set.
        """
        base = set(self.numbers)
        if self.region:
            base.update(_region_emergency_numbers(self.region))
        result = set(base)
        if self.outside_line_prefix:
            result.update(self.outside_line_prefix + n for n in base)
        return sorted(result, key=lambda n: (len(n), n))


def _region_emergency_numbers(region: str) -> set[str]:
    """Expand the region's emergency pattern into the short numbers it matches (at most 4 digits)."""
    from phonenumbers import PhoneMetadata
    from phonenumbers.shortnumberinfo import is_emergency_number

    metadata = PhoneMetadata.short_metadata_for_region(region.upper())
    if metadata is None or metadata.emergency is None:
        return set()
    lengths = metadata.emergency.possible_length or (3,)
    found: set[str] = set()
    for length in lengths:
        if length > 4:  # a longer pattern would mean 10^n candidates; no real emergency number is that long
            continue
        for value in range(10**length):
            candidate = f"{value:0{length}d}"
            if is_emergency_number(candidate, region):
                found.add(candidate)
    return found
