"""Campaign B, area 3 (second round): text from outside.

What is attacked, and the property each test holds the product to:

* outside text -- server messages (Information, Note, Error Message), JSON keys echoed in
  "fields named more than once", timestamps quoted by pandas, CSV cells quoted as
  non-numeric: whatever reaches stdout, stderr or the log is one line per message, with
  control characters, ESC, line breaks and direction marks escaped, capped at a few
  hundred characters, and never holds 4 or more characters of the API key, even when
  the key straddles a point where a text is cut (secure_ohlcv_downloader.outside_text).

Everything goes through the real client against a real HTTP server on 127.0.0.1 (the
campaign's HostileServer) and through the real command line in child processes.
"""

from __future__ import annotations

import re
import unicodedata

from hypothesis import strategies as st

import secure_ohlcv_downloader as product
from config import Secret
from secure_ohlcv_downloader import OUTSIDE_TEXT_LIMIT, outside_text
from tests.campaign.figures import campaign_budget
from tests.campaign.test_hostile_input import crash_kind, run_property

EXAMPLES = campaign_budget(60, 1500)
CLI_EXAMPLES = campaign_budget(3, 25)

# The API key of every run here. Its 4-character fragments appear in no message of ours,
# so any of them in an output is a leak.
API_KEY = "QWERTYUIOPASDFGH"
KEY_FRAGMENTS = {API_KEY[i:i + 4] for i in range(len(API_KEY) - 3)}
Secret(API_KEY)  # as the run's settings would: the in-process checks redact it too

# Where texts were (or are) cut: the old 40-byte body quote, the 100- and 120-character
# message cuts, the outside-text limit, and a few more.
CUTS = (40, 60, 100, 120, 160, 200, OUTSIDE_TEXT_LIMIT, OUTSIDE_TEXT_LIMIT + 1, 1000)
TAIL = re.compile(r"\.\.\. \((\d+) more characters\)$")
LINE_CAP = 3 * OUTSIDE_TEXT_LIMIT  # a whole output line: our words plus quoted text
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
FORGED = "\n2024-01-02 03:04:05,678 ERROR secure_ohlcv FORGED line"

UNSAFE_PIECES = ("\n", "\r", "\r\n", "\x1b[2J", "\x1b]0;owned\x07", "\x1b[31m", "\x00", "\x07",
                 "\x08", "\t", "\x7f", "\x85", "\x9b31m", "\u2028", "\u2029", "\u202e", "\u202d",
                 "\u2066", "\u2067", "\u2069", "\u200e", "\u200f", "\u061c", "\ufeff", "\u00ad",
                 "\ud800", "\U000e0001", FORGED, "\\x1b", "'", '"')
filler = st.text(alphabet=st.characters(blacklist_characters=sorted(set(API_KEY))), max_size=30)
piece = st.sampled_from(UNSAFE_PIECES) | filler | st.integers(0, 700).map(lambda n: "y" * n)


@st.composite
def hostile_text(draw) -> str:
    """Control characters, ESC sequences, line breaks, direction marks, forged log lines,
    long runs; often the API key placed so that it straddles a cut."""
    text = "".join(draw(st.lists(piece, max_size=8)))
    if draw(st.integers(0, 3)):
        cut = draw(st.sampled_from(CUTS))
        inside = draw(st.integers(1, len(API_KEY) - 1))  # key characters before the cut
        lead = draw(st.sampled_from(["", "Information: ", "\x1b[1m", "\n"]))
        pad = max(0, cut - inside - len(lead))
        text = lead + "x" * pad + API_KEY + text
    return text


def unsafe_characters(text: str) -> list[str]:
    """Characters repr() would escape (controls, line and paragraph separators, format
    characters such as direction marks, surrogates, unassigned code points)."""
    return sorted({ch for ch in text if not ch.isprintable()
                   or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")})


def leaks(text: str) -> list[str]:
    return sorted(f for f in KEY_FRAGMENTS if f in text)


# =========================================================================================
# outside_text itself
# =========================================================================================

def test_outside_text_is_one_safe_bounded_line(figures):
    """One line, nothing raw, nothing over the cap, no fragment of the key whatever the
    cut; plain short text comes back unchanged; applied again, nothing changes."""
    def check(case: tuple[str, int]) -> tuple[str, str] | None:
        text, limit = case
        try:
            shown = outside_text(text, limit)
        except Exception as exc:  # noqa: BLE001 - the property is about exactly this
            return f"outside_text raised {crash_kind(exc)}", repr(text[:80])
        if unsafe_characters(shown):
            return "an unsafe character came through", f"{unsafe_characters(shown)} in {shown[:80]!r}"
        if leaks(shown):
            return "a fragment of the key came through", f"{leaks(shown)} from {text[:80]!r}"
        tail = TAIL.search(shown)
        body = shown[:tail.start()] if tail else shown
        if len(body) > limit:
            return "longer than the cap", f"{len(body)} > {limit}"
        if tail is None and len(product.redact(text)) > limit:
            return "a long text was not cut", f"{len(text)} characters, no tail"
        if text.isprintable() and len(text) <= limit and not leaks(text) and shown != text:
            return "a plain short text was changed", f"{text!r} -> {shown!r}"
        if outside_text(shown, max(limit, len(shown))) != shown:
            return "not stable when applied to its own output", repr(shown[:80])
        return None

    limits = st.sampled_from([20, 100, OUTSIDE_TEXT_LIMIT])
    straddling = [(("x" * (cut - k)) + API_KEY + FORGED, limit)
                  for cut in CUTS for k in range(1, len(API_KEY)) for limit in (cut, OUTSIDE_TEXT_LIMIT)]
    run_property(st.tuples(hostile_text(), limits), check, figures, "text/outside-text",
                 examples=straddling, budget=EXAMPLES * 4,
                 notes=f"plus {len(straddling)} key placements straddling every cut")


def test_outside_text_caps_a_huge_text_after_redacting_all_of_it():
    """A 60 MB text (the CSV cell of the first review) comes back as a few hundred
    characters; a key right at the cut is redacted whole, not cut to a fragment."""
    huge = "x" * (OUTSIDE_TEXT_LIMIT - 5) + API_KEY + "z" * 60_000_000
    shown = outside_text(huge)

    assert len(shown) < OUTSIDE_TEXT_LIMIT + 40 and not leaks(shown), shown[-60:]
    assert shown.endswith(" more characters)")
    as_bytes = outside_text(huge.encode())
    assert as_bytes.endswith(f"({len(huge)} bytes in all)") and not leaks(as_bytes), as_bytes[-60:]
