"""What the long-term store reads in a text besides its embedding: terms, identity, time.

* :func:`query_terms` and :func:`match_expression`: the lexical (BM25) side of a search, the
  query's content words OR-ed into an FTS5 expression;
* :func:`normalise` and :func:`signature`: when two texts say the same thing. Two texts that
  differ in a number, a name, a date or a negation are different facts, however close their
  embeddings are (MiniLM puts "note 124 ... shed 124" at 0.95 of "note 121 ... shed 121");
* :func:`time_range`: the period a query names ("last week", "in May 2023", "yesterday"),
  relative to the time of the question;
* :class:`Stemmer`: the stems the FTS index stores for a query's words, so that their
  document frequencies can be looked up.

Functions over text; nothing here touches the store (the stemmer runs FTS5's tokenizer on a
table of its own, in memory).
"""

from __future__ import annotations

import calendar
import re
import sqlite3
import unicodedata
from datetime import UTC, datetime, timedelta

#: The FTS5 tokenizer of the items' lexical index (and of :class:`Stemmer`).
FTS_TOKENIZER = "porter unicode61"

#: Words that carry no topic: dropped from the lexical query (they would match every item).
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "about",
        "from",
        "into",
        "over",
        "after",
        "before",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "do",
        "does",
        "did",
        "doing",
        "have",
        "has",
        "had",
        "having",
        "i",
        "you",
        "he",
        "she",
        "it",
        "we",
        "they",
        "me",
        "him",
        "her",
        "us",
        "them",
        "my",
        "your",
        "his",
        "its",
        "our",
        "their",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "that",
        "this",
        "these",
        "those",
        "there",
        "here",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "just",
        "so",
        "than",
        "too",
        "very",
        "also",
        "as",
        "s",
        "t",
        "don",
        "am",
        "im",
        "ive",
        "id",
        "ill",
        "youre",
    ]
)

#: Words that turn a statement into its opposite: part of a text's :func:`signature`.
NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nobody",
        "nothing",
        "neither",
        "nor",
        "cannot",
        "cant",
        "dont",
        "doesnt",
        "didnt",
        "isnt",
        "arent",
        "wasnt",
        "werent",
        "wont",
        "wouldnt",
        "shouldnt",
        "couldnt",
        "havent",
        "hasnt",
        "hadnt",
        "without",
    ]
)

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")
_NAME = re.compile(r"\b([A-Z][\w'-]*)")
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (letters and digits; apostrophes dropped)."""
    folded = unicodedata.normalize("NFKC", text).replace("'", "").replace("\u2019", "")
    return [w.lower() for w in _WORD.findall(folded)]


def normalise(text: str) -> str:
    """``text`` reduced to its words: equal for texts that differ only in case, spacing and
    punctuation."""
    return " ".join(words(text))


def signature(text: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The numbers, names and negations of ``text``: two texts may be merged only when these
    are equal (and their meaning is close)."""
    numbers = frozenset(_NUMBER.findall(text))
    names = frozenset(m.lower() for m in _NAME.findall(text)) - STOP_WORDS
    months = frozenset(m[1].lower() for m in _MONTH_YEAR.finditer(text) if _is_month(m[1]))
    negations = frozenset(w for w in words(text) if w in NEGATIONS)
    return numbers | months, names, negations


def query_terms(text: str) -> list[str]:
    """The content words of a query, in order, each once (stop words dropped)."""
    seen: dict[str, None] = {}
    for word in words(text):
        if word not in STOP_WORDS:
            seen.setdefault(word, None)
    return list(seen)


class Stemmer:
    """The stems FTS5's :data:`FTS_TOKENIZER` makes of words, as the index stores them.

    Runs the tokenizer on an in-memory FTS5 table of its own and reads the stems back
    through ``fts5vocab``; SQLite has no other way to call a tokenizer. Not thread-safe:
    the caller holds the store's lock.
    """

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None  # opened on first use

    def stems(self, terms: list[str]) -> list[list[str]]:
        """The stems of each term, in order (``"adopted"`` -> ``["adopt"]``)."""
        if self._db is None:
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            db.execute(
                f"CREATE VIRTUAL TABLE words USING fts5 (body, tokenize = '{FTS_TOKENIZER}')"
            )
            db.execute("CREATE VIRTUAL TABLE stems USING fts5vocab (words, instance)")
            self._db = db
        out: list[list[str]] = [[] for _ in terms]
        self._db.execute("BEGIN")
        try:
            rows = list(enumerate(terms))
            self._db.executemany("INSERT INTO words (rowid, body) VALUES (?, ?)", rows)
            for doc, term in self._db.execute("SELECT doc, term FROM stems ORDER BY doc, offset"):
                out[int(doc)].append(str(term))
        finally:
            self._db.execute("ROLLBACK")  # the table stays empty
        return out

    def close(self) -> None:
        """Close the in-memory table, if it was opened."""
        db, self._db = self._db, None
        if db is not None:
            db.close()


def match_expression(terms: list[str]) -> str:
    """An FTS5 MATCH expression that ORs the terms (each quoted: no operator injection)."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


# -- time ---------------------------------------------------------------------------------------

_RELATIVE = re.compile(
    r"\b(yesterday|today|last\s+(?:week|month|year|night|weekend)|this\s+(?:week|month|year)"
    r"|(\d+|a|an|one|two|three|four|five|six|seven)\s+(day|week|month|year)s?\s+ago)\b",
    re.IGNORECASE,
)
_MONTH_YEAR = re.compile(
    r"\b(?:in\s+|of\s+|during\s+)?("
    + "|".join(sorted((m for m in _MONTHS if len(m) > 3 or m == "may"), key=len, reverse=True))
    + r")(?:\s+(\d{4}))?\b",
    re.IGNORECASE,
)
_YEAR = re.compile(r"\bin\s+((?:19|20)\d{2})\b", re.IGNORECASE)
_ISO = re.compile(r"\b((?:19|20)\d{2})-(\d{2})-(\d{2})\b")
_SMALL = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_SPANS = {"day": 1, "week": 7, "month": 30, "year": 365}


def time_range(text: str, now: float) -> tuple[float, float] | None:
    """The period (start, end) in UNIX seconds that ``text`` names, relative to ``now``, or
    None. Understood: ``yesterday``, ``today``, ``last/this week|month|year``, ``N days/weeks
    ago``, a month with or without a year (``in May``, ``May 2023``: without a year, the most
    recent May not after ``now``), ``in 2023`` and ISO dates."""
    ref = datetime.fromtimestamp(now, tz=UTC)
    day = ref.replace(hour=0, minute=0, second=0, microsecond=0)
    if m := _ISO.search(text):
        try:
            start = datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=UTC)
        except ValueError:
            return None
        return _span(start, start + timedelta(days=1))
    if m := _RELATIVE.search(text):
        phrase = m[1].lower()
        if phrase == "yesterday":
            return _span(day - timedelta(days=1), day)
        if phrase == "today":
            return _span(day, day + timedelta(days=1))
        if m[2]:
            count = int(m[2]) if m[2].isdigit() else _SMALL[m[2].lower()]
            days = count * _SPANS[m[3].lower()]
            centre = day - timedelta(days=days)
            slack = timedelta(days=max(1, days // 4))
            return _span(centre - slack, centre + slack + timedelta(days=1))
        unit = phrase.split()[-1]
        if unit == "night":
            return _span(day - timedelta(days=1), day + timedelta(hours=6))
        if unit == "weekend":
            start = day - timedelta(days=(day.weekday() + 2) % 7 + 1)
            return _span(start, start + timedelta(days=3))
        days = {"week": 7, "month": 31, "year": 366}[unit]
        if phrase.startswith("this"):
            return _span(day - timedelta(days=days), day + timedelta(days=1))
        return _span(day - timedelta(days=2 * days), day)
    m = next((m for m in _MONTH_YEAR.finditer(text) if _is_month(m[1])), None)
    if m is not None:
        month = _MONTHS[m[1].lower()]
        year = int(m[2]) if m[2] else (ref.year if month <= ref.month else ref.year - 1)
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return _span(start, end)
    if m := _YEAR.search(text):
        year = int(m[1])
        return _span(datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC))
    return None


def _is_month(word: str) -> bool:
    """A month name, written with a capital: not the verbs "may", "march" or "august"."""
    return word[:1].isupper()


def _span(start: datetime, end: datetime) -> tuple[float, float]:
    return start.timestamp(), end.timestamp()


def day_label(stamp: float) -> str:
    """``[YYYY-MM-DD]`` of a UNIX time (UTC), as rendered memories carry it."""
    return datetime.fromtimestamp(stamp, tz=UTC).strftime("[%Y-%m-%d]")
