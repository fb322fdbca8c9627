"""The Runtime's intent methods on the tiny model: import_history (journalled with each
message's time and speaker, decoded only when the session is next used), chat(created_at=),
delete_session's SessionNotFoundError, the one text rule, and the inspection methods the demo
uses (session_info kv_cells, window_seqs, checkpoints, time_reprefill)."""

from __future__ import annotations

import datetime as dt
import inspect
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.app import (
    MAX_TEXT_CHARS,
    Runtime,
    RuntimeArgumentError,
    SessionLimitError,
    SessionNotFoundError,
)
from runtime.errors import (
    ArgumentError,
    ClosedError,
    ContextFullError,
    ModelFileError,
    SessionError,
)
from runtime.journal import Journal
from runtime.longterm import items

GREEDY = {"temperature": 0.0, "max_tokens": 8}
WHEN = dt.datetime(2023, 5, 8, 13, 56, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def embedder() -> object:
    from runtime.embed import Embedder

    return Embedder.default()


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    with Runtime.open(tmp_path / "data", model="tiny", n_ctx=1024, embedder=False) as r:
        yield r


def test_import_history_journals_without_decoding(rt: Runtime) -> None:
    rt.chat("resident", "a session that holds cells", **GREEDY)  # another, resident session
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": "I moved to Lisbon.",
            "name": "Caroline",
            "created_at": WHEN.isoformat(),
        },
        {"role": "assistant", "content": "Nice city.", "created_at": WHEN.timestamp() + 60},
        {"role": "user", "content": "Where do I live?"},
    ]
    seqs = rt.import_history("imported", messages)
    assert seqs == [0, 1, 2, 3]
    history = rt.history("imported")
    assert [(h["seq"], h["role"], h["text"]) for h in history] == [
        (seq, m["role"], m["content"]) for seq, m in zip(seqs, messages, strict=True)
    ]
    assert history[1]["created"] == WHEN.timestamp()
    assert history[1]["name"] == "Caroline"
    assert "name" not in history[2]
    assert history[2]["created"] == WHEN.timestamp() + 60
    # nothing was decoded: the session holds no cells until it is next used
    info = rt.session_info("imported")
    assert info["exists"] and not info["resident"] and info["kv_cells"] == 0
    assert rt.window_seqs("imported") == []
    assert rt.session_info("resident")["kv_cells"] > 0  # and nobody was suspended for it

    reply = rt.chat("imported", "And my name?", **GREEDY)
    assert reply.resumed is not None
    assert reply.resumed.replayed_tokens > 0  # the imported window, decoded now
    assert reply.cached_tokens == reply.resumed.n_tokens
    assert rt.window_seqs("imported")[:4] == seqs
    assert [h["text"] for h in rt.history("imported")][4] == "And my name?"


def test_import_history_continues_the_kv_like_chat(rt: Runtime) -> None:
    first = rt.chat("twin", "one", **GREEDY)
    rt.import_history(
        "copy",
        [{"role": "user", "content": "one"}, {"role": "assistant", "content": first.text}],
    )
    a = rt.chat("twin", "two", **GREEDY)
    b = rt.chat("copy", "two", **GREEDY)
    # the imported copy renders to the same tokens, so the next turn sees the same KV
    assert a.cached_tokens == b.cached_tokens and a.text == b.text


def test_import_history_starts_a_new_session_with_the_system_prompt(rt: Runtime) -> None:
    seqs = rt.import_history("plain", [{"role": "user", "content": "hi"}])
    assert seqs == [1]  # entry 0 is the runtime's system prompt, as after a first chat
    assert [h["role"] for h in rt.history("plain")] == ["system", "user"]
    seqs = rt.import_history("plain", [{"role": "assistant", "content": "hello"}])
    assert seqs == [2]


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": ""}], "messages[0].content"),
        (
            [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
            "messages[1].role",
        ),
        ([{"role": "user", "content": "x", "created_at": "yesterday"}], "messages[0].created_at"),
        ([{"role": "user", "content": "x", "name": ""}], "messages[0].name"),
        # a surrogate in a name failed in the journal's JSON: after earlier messages were in
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
          "name": "a\ud800"}], "messages[1].name"),
        ([{"role": "user", "content": "x", "refusal": "no"}], "messages[0].refusal"),
    ],
)  # fmt: skip
def test_import_history_refuses_bad_messages(
    rt: Runtime, messages: list[dict[str, object]], field: str
) -> None:
    with pytest.raises(RuntimeArgumentError) as info:
        rt.import_history("bad", messages)
    assert info.value.field == field
    assert rt.history("bad") == []  # nothing journalled
    assert "bad" not in rt.sessions()


def test_import_history_takes_an_openai_response_message(rt: Runtime) -> None:
    """A message copied from an OpenAI response carries empty extras; they are no typo."""
    reply = {"role": "assistant", "content": "Hi.", "refusal": None, "tool_calls": [],
             "annotations": [], "audio": None, "function_call": None}  # fmt: skip
    assert len(rt.import_history("oai", [{"role": "user", "content": "Hello."}, reply])) == 2
    assert [h["text"] for h in rt.history("oai") if h["role"] != "system"] == ["Hello.", "Hi."]


def test_import_history_refuses_what_does_not_fit(rt: Runtime) -> None:
    long = " ".join(f"word{i}" for i in range(1500))
    with pytest.raises(ContextFullError):
        rt.import_history("big", [{"role": "user", "content": long}])
    assert rt.history("big") == []


def test_chat_keeps_its_created_at(rt: Runtime) -> None:
    rt.chat("dated", "hello", created_at=WHEN.timestamp(), **GREEDY)
    rt.chat("dated", "again", created_at="2023-05-09T10:00:00", **GREEDY)  # naive: UTC
    users = [h for h in rt.history("dated") if h["role"] == "user"]
    assert users[0]["created"] == WHEN.timestamp()
    assert users[1]["created"] == dt.datetime(2023, 5, 9, 10, tzinfo=dt.UTC).timestamp()
    with pytest.raises(RuntimeArgumentError, match="created_at"):
        rt.chat("dated", "x", created_at="not a time", **GREEDY)


def test_delete_session_names_an_unknown_id(rt: Runtime) -> None:
    with pytest.raises(SessionNotFoundError):
        rt.delete_session("nobody")
    rt.chat("somebody", "hi", **GREEDY)
    rt.delete_session("somebody")
    assert "somebody" not in rt.sessions()
    with pytest.raises(SessionNotFoundError):
        rt.delete_session("somebody")


def test_one_text_rule(rt: Runtime) -> None:
    """A turn and a stored memory pass the same rule (``runtime.arguments``)."""
    assert MAX_TEXT_CHARS == 100_000
    with pytest.raises(RuntimeArgumentError, match=f"at most {MAX_TEXT_CHARS}") as info:
        rt.chat("long", "x" * (MAX_TEXT_CHARS + 1))
    assert info.value.field == "text"
    assert rt.history("long") == []
    item = items.NewItem("x" * (MAX_TEXT_CHARS + 1), kind="fact")
    with pytest.raises(ArgumentError, match=f"at most {MAX_TEXT_CHARS}"):
        items.check_item(item)
    items.check_item(items.NewItem("x" * MAX_TEXT_CHARS, kind="fact"))


@pytest.mark.parametrize(
    ("bad", "why"),
    [("a\x00b", "NUL character"), ("caf\udce9 latte", "not valid Unicode")],
    ids=["nul", "surrogate"],
)
def test_the_text_rule_refuses_what_no_text_can_hold(
    tmp_path: Path, embedder: object, bad: str, why: str
) -> None:
    """A NUL (llama.cpp's strings end at one) and a lone surrogate (a JSON "\\udce9" escape,
    or a byte that is not UTF-8 read with ``surrogateescape``) are refused by every call that
    takes a text, naming the argument, with nothing written: no bare ``ArgumentError`` from
    the tokenizer, no ``TypeError`` from the embedder."""
    with Runtime.open(tmp_path / "d", model="tiny", n_ctx=256, embedder=embedder) as rt:
        _refuses_everywhere(rt, bad, why)


def _refuses_everywhere(rt: Runtime, bad: str, why: str) -> None:
    with pytest.raises(RuntimeArgumentError, match=why) as info:
        rt.chat("odd", bad, **GREEDY)
    assert info.value.field == "text"
    with pytest.raises(RuntimeArgumentError, match=why) as info:
        rt.import_history("odd", [{"role": "user", "content": bad}])
    assert info.value.field == "messages[0].content"
    assert rt.history("odd") == [] and "odd" not in rt.sessions()
    for call in (
        lambda: rt.remember(bad),
        lambda: rt.search(bad),
        lambda: rt.embed([bad]),
    ):
        with pytest.raises(RuntimeArgumentError, match=why):
            call()
    assert rt.search("latte") == []
    with pytest.raises(ArgumentError, match=why):
        items.check_item(items.NewItem(bad, kind="fact"))


def test_suspend_shows_in_session_info_and_checkpoints(rt: Runtime) -> None:
    rt.chat("bruno", "Thanks, that is all for now.", **GREEDY)
    before = rt.session_info("bruno")["kv_cells"]
    assert before == rt.session_info("bruno")["window_tokens"] > 0
    assert rt.time_reprefill("bruno") > 0.0
    rt.suspend("bruno")
    assert rt.session_info("bruno")["kv_cells"] == 0
    checkpoints = rt.checkpoints("bruno")
    assert checkpoints and checkpoints[0]["tokens"] == before
    assert all(Path(path).is_file() for path in checkpoints[0]["files"])
    with pytest.raises(SessionNotFoundError):
        rt.time_reprefill("bruno")  # not resident now


def test_public_methods_refuse_after_close(tmp_path: Path) -> None:
    rt = Runtime.open(tmp_path / "d", model="tiny", n_ctx=256, embedder=False)
    rt.close()
    for call in (
        lambda: rt.sessions(),
        lambda: rt.history("s"),
        lambda: rt.search("q"),
        lambda: rt.forget("x"),
        lambda: rt.stats(),
        lambda: rt.import_history("s", [{"role": "user", "content": "x"}]),
    ):
        with pytest.raises(ClosedError):
            call()


def test_every_public_method_is_a_locked_door() -> None:
    methods = {n for n, f in vars(Runtime).items() if inspect.isfunction(f) and n[0] != "_"}
    doors = {n for n in methods if hasattr(vars(Runtime)[n], "__wrapped__")}
    assert methods - doors == {"close"}  # close takes the lock in two steps by itself


def test_an_unknown_sampling_argument_is_refused(rt: Runtime) -> None:
    with pytest.raises(TypeError, match="max_token"):
        rt.chat("s", "hi", max_token=3)  # type: ignore[call-arg]
    assert rt.history("s") == []


def test_memory_calls_take_the_runtime_lock(tmp_path: Path, embedder: object) -> None:
    with Runtime.open(tmp_path / "d", model="tiny", n_ctx=256, embedder=embedder) as rt:
        item = rt.remember("The vault code is 4711.")
        done = threading.Event()
        results: list[object] = []

        def search() -> None:
            results.append(rt.search("vault code", 1))
            done.set()

        with rt._lock:  # held as a turn would hold it: the search must wait
            thread = threading.Thread(target=search)
            thread.start()
            assert not done.wait(0.3)
        thread.join(10)
        assert done.is_set() and results[0][0].id == item  # type: ignore[index]


def test_imported_user_turns_reach_long_term_memory(tmp_path: Path, embedder: object) -> None:
    with Runtime.open(tmp_path / "d", model="tiny", n_ctx=1024, embedder=embedder) as rt:
        rt.import_history(
            "ada",
            [
                {"role": "user", "content": "My sister Ada keeps bees in Porto."},
                {"role": "assistant", "content": "Lovely."},
            ],
        )
        rt.import_history(
            "quiet", [{"role": "user", "content": "Keep this one to yourself."}], remember=False
        )
        rt.chat("ada", "hello", **GREEDY)  # the next turn catches long-term memory up
        rt.chat("quiet", "hello", **GREEDY)
        assert any("bees" in h.text for h in rt.search("bees Porto", 3, session="ada"))
        assert not any(
            "yourself" in h.text for h in rt.search("keep to yourself", 3, session="quiet")
        )


def test_max_sessions_refuses_a_new_session_and_writes_nothing(tmp_path: Path) -> None:
    with Runtime.open(
        tmp_path / "d", model="tiny", n_ctx=256, embedder=False, max_sessions=2
    ) as rt:
        rt.chat("a", "one", **GREEDY)
        rt.import_history("b", [{"role": "user", "content": "two"}])
        for refused in (
            lambda: rt.chat("c", "three", **GREEDY),
            lambda: rt.import_history("c", [{"role": "user", "content": "three"}]),
        ):
            with pytest.raises(SessionLimitError, match="max_sessions=2"):
                refused()
            assert rt.sessions() == ["a", "b"]  # nothing written for "c"
        rt.chat("a", "existing sessions go on", **GREEDY)
        rt.delete_session("b")
        rt.chat("c", "now there is room", **GREEDY)
        assert rt.sessions() == ["a", "c"]


def test_session_ttl_expires_idle_sessions_with_their_memories(
    tmp_path: Path, embedder: object
) -> None:
    ttl = 1.5
    with Runtime.open(
        tmp_path / "d", model="tiny", n_ctx=256, embedder=embedder, session_ttl_s=ttl
    ) as rt:
        rt.chat("old", "My locker code is 8812.", **GREEDY)
        assert any("8812" in h.text for h in rt.search("locker code", 3, session="old"))
        deadline = time.monotonic() + 4 * ttl
        while time.monotonic() < deadline:
            rt.chat("live", "still here", **GREEDY)  # written every round: never idle
            if "old" not in rt.sessions():
                break
            time.sleep(0.2)
        assert rt.sessions() == ["live"]
        assert not any("8812" in h.text for h in rt.search("locker code", 5))
        assert not rt.session_info("old")["exists"]
        with pytest.raises(SessionNotFoundError):
            rt.delete_session("old")


def test_a_restart_does_not_expire_old_sessions_at_once(tmp_path: Path) -> None:
    """Idle time counts from the process's start too: a runtime reopened after a long stop
    gives every session a full ttl before the sweep deletes it."""
    data = tmp_path / "d"
    with Runtime.open(data, model="tiny", n_ctx=256, embedder=False) as rt:
        rt.chat("a", "hello", **GREEDY)
    for f in (data / "journals").iterdir():
        os.utime(f, (1.0, 1.0))  # last written in 1970
    ttl = 1.5
    with Runtime.open(data, model="tiny", n_ctx=256, embedder=False, session_ttl_s=ttl) as rt:
        start = time.monotonic()
        time.sleep(ttl / 2)  # a few sweeps (one per ttl / 4)
        assert rt.sessions() == ["a"]
        while "a" in rt.sessions() and time.monotonic() - start < 4 * ttl:
            time.sleep(0.1)
        assert rt.sessions() == [] and time.monotonic() - start >= ttl


def _user_turns(rt: Runtime, sid: str) -> list[dict[str, object]]:
    return [
        {"role": h["role"], "content": h["text"]} for h in rt.history(sid) if h["role"] != "system"
    ]


def test_a_session_another_model_journalled_is_refused_not_garbled(
    tmp_path: Path, tiny_model_path: Path, other_model_path: Path
) -> None:
    """A journal's token ids are its vocabulary's, rendered with its chat template: decoded
    under another, the session went on from nonsense (or failed on an id past the
    vocabulary). Now the resume refuses, saying what to do, and changes nothing; the history
    carries over into a new session; the first model goes on with the old one. Another file
    of the same vocabulary and template (other weights: a re-quantisation, say) reads it."""
    from llamaffi.testing import LLAMA3_CHAT_TEMPLATE, make_model

    foreign = make_model(
        tmp_path / "llama3.gguf", preset="tiny", chat_template=LLAMA3_CHAT_TEMPLATE
    )
    data = tmp_path / "data"
    with Runtime.open(data, tiny_model_path, embedder=False) as rt:
        rt.chat("zed", "My name is Zed.", **GREEDY)
        before = rt.history("zed")
    shutil.rmtree(data / "kv")  # no checkpoint names the model: the entries' own tags do
    with Runtime.open(data, foreign, embedder=False) as rt:
        for _ in range(2):  # refused again, not half-resumed
            with pytest.raises(SessionError, match=r"journalled with model .* open the data"):
                rt.chat("zed", "What is my name?", **GREEDY)
        assert rt.history("zed") == before  # nothing was changed
        rt.import_history("zed-2", _user_turns(rt, "zed"))
        reply = rt.chat("zed-2", "What is my name?", **GREEDY)
        assert reply.resumed is not None and reply.resumed.replayed_tokens > 0
    with Runtime.open(data, other_model_path, embedder=False) as rt:
        resumed = rt.chat("zed", "Again?", **GREEDY).resumed
        assert resumed is not None and resumed.source == "journal"  # same vocabulary: read
    with Runtime.open(data, tiny_model_path, embedder=False) as rt:
        assert rt.chat("zed", "And again?", **GREEDY).resumed is not None
        with pytest.raises(SessionError, match="journalled with model"):
            rt.chat("zed-2", "and you?", **GREEDY)  # the llama3 template's tokens now


def test_an_untagged_journal_is_refused_by_its_checkpoints_model(
    tmp_path: Path, tiny_model_path: Path, other_model_path: Path
) -> None:
    """A journal from before entries recorded their vocabulary: its newest checkpoint names
    the model file that made its tokens, and another file is refused (its vocabulary cannot
    be compared without that file)."""
    data = tmp_path / "data"
    with Runtime.open(data, tiny_model_path, embedder=False) as rt:
        rt.chat("old", "My name is Zed.", **GREEDY)
    path = data / "journals" / "old.log"
    with Journal(path, readonly=True) as journal:
        entries = list(journal)
    assert all("model" in e.meta for e in entries if e.tokens)
    for f in data.glob("journals/old.log*"):
        f.unlink()
    with Journal(path) as journal:  # the same entries, untagged
        for e in entries:
            meta = {k: v for k, v in e.meta.items() if k != "model"}
            journal.append(e.role, e.text, e.tokens, meta, created=e.created)
    with (
        Runtime.open(data, other_model_path, embedder=False) as rt,
        pytest.raises(SessionError, match="journalled with model"),
    ):
        rt.chat("old", "What is my name?", **GREEDY)
    with Runtime.open(data, tiny_model_path, embedder=False) as rt:
        assert rt.chat("old", "Again?", **GREEDY).resumed.source == "snapshot"


def test_memories_stored_for_a_session_before_it_spoke_go_with_it(
    tmp_path: Path, embedder: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``remember(..., session=)`` may seed a session before its first turn; deleting that
    session raised SessionNotFoundError and left the memories for ever (searchable, and no
    expiry reached them)."""
    import runtime.longterm.forget as forget

    scrubs: list[object] = []
    scrub = forget.scrub
    monkeypatch.setattr(forget, "scrub", lambda *a: (scrubs.append(a), scrub(*a)))
    with Runtime.open(tmp_path / "d", model="tiny", n_ctx=256, embedder=embedder) as rt:
        with pytest.raises(SessionNotFoundError):
            rt.delete_session("nobody")
        assert scrubs == []  # nothing went: no vacuum, no index rebuild under the lock
        rt.remember("Kim's locker code is 2718.", session="kim")
        assert [h.text for h in rt.search("locker code", session="kim")]
        rt.delete_session("kim")
        assert len(scrubs) == 1  # its memory went: scrubbed
        assert rt.search("locker code", session="kim") == []
        with pytest.raises(SessionNotFoundError):
            rt.delete_session("kim")  # gone now
        rt.remember("Lee's code is 3141.", session="lee")
        with pytest.raises(SessionNotFoundError):  # nothing but memories, which stay
            rt.delete_session("lee", memories=False)
        assert [h.text for h in rt.search("code", session="lee")] == ["Lee's code is 3141."]


def test_a_bad_model_leaves_no_new_data_directory(tmp_path: Path) -> None:
    """The error was clear, but the directory (with runtime.lock) was made first and left."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError):
        Runtime.open(tmp_path / "new", model=bad)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("x")
    with pytest.raises(ModelFileError):
        Runtime.open(kept, model=bad)
    assert (kept / "mine.txt").read_text() == "x"  # a directory that was there stays
