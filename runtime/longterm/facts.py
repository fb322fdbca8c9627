"""Facts from turns: short, self-contained statements with the speaker resolved.

:func:`extract` is the rule-based extractor that works with any model: "I moved to Berlin",
said by Caroline, becomes "Caroline lives in Berlin." about (``caroline``, ``location``).
A fact with an attribute is single-valued: a newer one about the same subject and
attribute supersedes the older one (the store marks it, see
:meth:`runtime.longterm.MemoryStore.put`). A first-person statement that matches no pattern
becomes a fact without an attribute (it never supersedes anything), its pronouns resolved.

:func:`parse_llm_facts` validates what a model returned when asked for JSON facts
(``extract="llm"``): anything malformed yields no facts, and the caller falls back to the
rules, so a turn is never lost to a bad answer (mem0 #4540 drops facts on malformed JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from runtime.longterm.lexical import NEGATIONS, normalise

#: A fact's text is at most this long (longer values are cut at a word boundary).
MAX_FACT_CHARS = 240
#: Statements shorter than this many words make no fact (greetings, "me too").
MIN_STATEMENT_WORDS = 4


@dataclass(frozen=True)
class Fact:
    """One distilled fact: its text, what it is about and its value."""

    text: str
    subject: str
    attribute: str | None = None
    value: str = ""


_VALUE = r"(?P<v>[^.,;!?\n]{1,80})"
#: (pattern on the speaker's own words, attribute, how the fact reads with {s} the subject)
_RULES: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), attribute, template)
    for p, attribute, template in (
        (
            r"\bI(?:'ve| have)? (?:just |recently |now )?moved to " + _VALUE,
            "location",
            "{s} lives in {v}.",
        ),
        (r"\bI (?:now |still )?live in " + _VALUE, "location", "{s} lives in {v}."),
        (r"\bI(?:'m| am) (?:now )?living in " + _VALUE, "location", "{s} lives in {v}."),
        (r"\bI (?:now |still )?work (?:at|for) " + _VALUE, "employer", "{s} works at {v}."),
        (r"\bI(?:'m| am) (?:now )?working (?:at|for) " + _VALUE, "employer", "{s} works at {v}."),
        (
            r"\bI(?:'ve| have)? (?:just )?(?:started|joined) (?:a new job )?at " + _VALUE,
            "employer",
            "{s} works at {v}.",
        ),
        (r"\bI(?:'m| am) (?:now )?(?P<v>\d{1,3}) years old", "age", "{s} is {v} years old."),
        (r"\bmy name is " + _VALUE, "name", "{s}'s name is {v}."),
        (
            r"\bI(?:'m| am) (?:now )?(?:a|an) (?P<v>[a-z][a-z -]{2,40}?) by (?:profession|trade)",
            "job",
            "{s} is a {v}.",
        ),
        (r"\bI work as (?:a|an) " + _VALUE, "job", "{s} works as a {v}."),
    )
)
_MY_IS = re.compile(
    r"\bmy (?P<a>(?:[a-z]+ ){0,3}?[a-z]+) (?:is|has changed to|changed to|is now) " + _VALUE,
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_FIRST_PERSON = re.compile(r"\b(I|I'm|I've|I'd|I'll|my|me|myself|mine)\b", re.IGNORECASE)
_PRONOUNS = (
    (re.compile(r"\bI'm\b", re.IGNORECASE), "{s} is"),
    (re.compile(r"\bI've\b", re.IGNORECASE), "{s} has"),
    (re.compile(r"\bI'd\b", re.IGNORECASE), "{s} would"),
    (re.compile(r"\bI'll\b", re.IGNORECASE), "{s} will"),
    (re.compile(r"\bI am\b"), "{s} is"),
    (re.compile(r"\bI was\b"), "{s} was"),
    (re.compile(r"\bI\b"), "{s}"),
    (re.compile(r"\bmyself\b", re.IGNORECASE), "{s}"),
    (re.compile(r"\bmy\b", re.IGNORECASE), "{s}'s"),
    (re.compile(r"\bmine\b", re.IGNORECASE), "{s}'s"),
    (re.compile(r"\bme\b", re.IGNORECASE), "{s}"),
)
#: Words of "my X is Y" that make no attribute (feelings, not facts).
_NOT_ATTRIBUTES = frozenset(
    ["day", "week", "life", "heart", "mind", "bad", "pleasure", "point", "guess", "dream", "goal"]
)


def extract(text: str, speaker: str | None) -> list[Fact]:
    """The facts in one turn said by ``speaker`` (None: "The user")."""
    subject = speaker.strip() if speaker and speaker.strip() else "The user"
    key = normalise(subject)
    facts: list[Fact] = []
    seen: set[str] = set()

    def keep(fact: Fact) -> None:
        norm = normalise(fact.text)
        if norm and norm not in seen:
            seen.add(norm)
            facts.append(fact)

    for sentence in _SENTENCE.findall(text):
        if not _asserts(sentence):
            continue  # a question, a hypothetical or a negation states no value
        matched = False
        for pattern, attribute, template in _RULES:
            if m := pattern.search(sentence):
                value = _clean(m["v"])
                keep(Fact(_cut(template.format(s=subject, v=value)), key, attribute, value))
                matched = True
        if m := _MY_IS.search(sentence):
            attribute = normalise(m["a"])
            if attribute.split()[-1] not in _NOT_ATTRIBUTES:
                value = _clean(m["v"])
                keep(Fact(_cut(f"{subject}'s {attribute} is {value}."), key, attribute, value))
                matched = True
        if not matched and _is_statement(sentence):
            keep(Fact(_cut(_resolve(sentence.strip(), subject)), key))
    return facts


_HYPOTHETICAL = re.compile(
    r"^\s*(?:should|would|could|can|may|might|shall|will|do|does|did|is|are|am|was|were|what"
    r"|why|how|when|where|who|which|if|whether|maybe|perhaps)\b",
    re.IGNORECASE,
)


def _asserts(sentence: str) -> bool:
    """A sentence that states something: not a question, not a hypothetical ("What if…",
    "Should I…"), and not negated ("My name is not Bob": the value is not Bob)."""
    s = sentence.strip()
    if not s or s.endswith("?") or _HYPOTHETICAL.search(s):
        return False
    return not (set(normalise(s).split()) & NEGATIONS)


def _is_statement(sentence: str) -> bool:
    """A first-person statement (not a question) long enough to say something."""
    s = sentence.strip()
    return (
        not s.endswith("?")
        and len(s.split()) >= MIN_STATEMENT_WORDS
        and _FIRST_PERSON.search(s) is not None
    )


def _resolve(sentence: str, subject: str) -> str:
    """First-person pronouns replaced by the subject ("I adopted a cat" -> "Caroline
    adopted a cat")."""
    out = sentence
    for pattern, replacement in _PRONOUNS:
        out = pattern.sub(replacement.format(s=subject), out)
    if out and not out.endswith((".", "!", "?")):
        out += "."
    return out[0].upper() + out[1:] if out else out


#: Words after a value that say when or how, not what ("Berlin last month", "Acme now").
_TRAILING = re.compile(
    r"(?:\s+(?:now|again|too|as well|these days|anymore|recently|yesterday|today|(?:last|this|"
    r"next)\s+(?:week|month|year|weekend)|in\s+\d{4}|\d+\s+\w+\s+ago|a\s+\w+\s+ago|with\s+.*"
    r"|and\s+.*|because\s+.*|since\s+.*|for\s+.*|where\s+.*|which\s+.*|but\s+.*|so\s+.*))+$",
    re.IGNORECASE,
)


def _clean(value: str) -> str:
    """A value without the when/how words that follow it."""
    value = value.strip().strip("\"'")
    return _TRAILING.sub("", value).strip() or value


def _cut(text: str) -> str:
    if len(text) <= MAX_FACT_CHARS:
        return text
    return text[: MAX_FACT_CHARS - 1].rsplit(" ", 1)[0] + "…"


#: What the LLM extractor (``extract="llm"``) asks the model about one turn.
FACT_INSTRUCTIONS = (
    "List the facts the message states about the speaker or the people it names. Answer "
    'with JSON only: {"facts": [{"text": "one short sentence that names the person", '
    '"subject": "the person it is about", "attribute": "what it is about (location, job, '
    'pet, ...), or null", "value": "the value, or null"}]}. Answer {"facts": []} when the '
    "message states no fact."
)
#: A model's answer with more facts than this is not a turn's facts: it is refused.
MAX_LLM_FACTS = 8
#: What a model may write as the subject of a fact about the speaker.
_SELF = ("i", "me", "myself", "the speaker", "speaker", "the user", "user")
#: Words that name no one by themselves (a pronoun, someone else's relation).
_NO_ONE = frozenset(["he", "she", "they", "we", "you", "him", "her", "them", "it", "us"])
_OTHERS = frozenset(["his", "her", "their", "your"])
#: The speaker's own relations: "my brother" is the speaker's brother.
_POSSESSIVE = frozenset(["my", "our"])


def _subject(named: str | None, own: str) -> tuple[str, bool]:
    """Who a model's fact is about, and whether that is someone its attribute may belong
    to: the speaker (no subject, or "I"); a relation of the speaker's ("my brother" said by
    Ana is "ana my brother", never Tom's brother); a name. A pronoun ("he", "they") or
    someone else's relation ("her sister") names no one: the fact is kept, its attribute
    dropped."""
    words = normalise(named or "").split()
    if not words or " ".join(words) in (own, *_SELF):
        return own, True
    if (words[0] in _NO_ONE and len(words) == 1) or words[0] in _OTHERS:
        return own, False
    if words[0] in _POSSESSIVE:
        return f"{own} {' '.join(words)}", True
    return " ".join(words), True


def parse_llm_facts(answer: str, speaker: str | None) -> list[Fact] | None:
    """The facts of a model's JSON answer (``{"facts": [{"text", "subject"?, "attribute"?,
    "value"?}]}`` or a bare list), or None when it is not valid: the caller then uses
    :func:`extract`.

    A fact is about the speaker unless its ``subject`` names someone else (:func:`_subject`);
    a fact about someone else keeps its attribute only for that person, so "my brother lives
    in Paris" never supersedes where the speaker lives. An attribute without a value is
    dropped (it would supersede with nothing), and within one answer a second fact with the
    same subject and attribute loses its attribute (one turn cannot say two current
    values)."""
    own = normalise(speaker) if speaker else "the user"
    start, end = answer.find("{"), answer.rfind("}")
    list_start = answer.find("[")
    try:
        if list_start != -1 and (start == -1 or list_start < start):
            doc: object = json.loads(answer[list_start : answer.rfind("]") + 1])
        elif start != -1 and end > start:
            doc = json.loads(answer[start : end + 1])
        else:
            return None
    except ValueError:
        return None
    rows = doc.get("facts") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        return None
    facts: list[Fact] = []
    seen: set[tuple[str, str | None]] = set()
    for row in rows:
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            return None
        text = row["text"].strip()
        attribute, value, named = row.get("attribute"), row.get("value"), row.get("subject")
        value = "" if value is None else value
        if not text or len(text) > MAX_FACT_CHARS or not isinstance(value, str):
            return None
        if attribute is not None and not isinstance(attribute, str):
            return None
        if named is not None and not isinstance(named, str):
            return None
        subject, known = _subject(named, own)
        # an attribute supersedes: only with a value, and only for a subject one can name
        keep = bool(attribute) and bool(value.strip()) and known
        key = (subject, normalise(attribute) if keep and attribute else None)
        if key[1] is not None and key in seen:
            key = (subject, None)
        seen.add(key)
        facts.append(Fact(text, subject, key[1], value))
    return facts if len(facts) <= MAX_LLM_FACTS else None
