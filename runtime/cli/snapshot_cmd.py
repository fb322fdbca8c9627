"""``python -m runtime snapshot inspect|verify``: look at and check KV snapshot files.

Neither command loads libllama: both work from the file alone.

A directory that is a chunk store (``runtime.chunks.ChunkStore``: ``chunks/`` and
``manifests/`` inside) is checked as one: every manifest, every chunk file (completely), and
every reference; missing chunks and damaged files are damage, orphans (chunks no manifest
names, left by a crash before garbage collection) are reported but are not.

Exit codes: 0 when every file checked is sound, 1 when any is damaged or unreadable, 2 when a
path given does not exist (nothing is checked then). ``verify`` on a directory that holds no
snapshot files exits 0, as an empty store has nothing damaged, but says so on stderr (even
with ``-q``), so that a wrong directory does not pass silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from runtime import snapshot
from runtime.chunks import MANIFEST_MAGIC, ChunkStore, Manifest
from runtime.snapshot import CorruptSnapshotError, UnsupportedVersionError

_SHOWN_TOKENS = 16


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` and ``verify`` subcommands to the ``snapshot`` group's parser."""
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect_p = commands.add_parser(
        "inspect", help="print a snapshot's or a chunk manifest's header (the payload is not read)"
    )
    inspect_p.add_argument("file", type=Path, help="a .kvsnap or .kvman file")
    inspect_p.add_argument("--json", action="store_true", help="print the header as JSON")
    inspect_p.add_argument("--tokens", action="store_true", help="print every token id")
    inspect_p.set_defaults(func=cmd_inspect)

    verify_p = commands.add_parser(
        "verify",
        help="check snapshot files completely (header, checksums, any zstd frames); "
        "exit 1 on any damage, 2 if a path does not exist",
        description="Check snapshot files completely (header, checksums, any zstd frames); a "
        "chunk store directory is checked as one (manifests, chunks, references; missing "
        "chunks are damage, orphans are reported). "
        "Exit 0 if every file is sound, 1 if any is damaged or unreadable, 2 if a path does "
        "not exist. A directory with no *.kvsnap files is not an error: verify says so on "
        "stderr and exits 0.",
    )
    verify_p.add_argument(
        "paths", type=Path, nargs="+", metavar="FILE|DIR", help="files, or directories to walk"
    )
    verify_p.add_argument("-q", "--quiet", action="store_true", help="report damage only")
    verify_p.set_defaults(func=cmd_verify)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the header of ``args.file`` (a snapshot, a chunk, or a chunk store's manifest);
    exit 1 if it is unreadable or damaged."""
    try:
        with open(args.file, "rb") as f:
            is_manifest = f.read(len(MANIFEST_MAGIC)) == MANIFEST_MAGIC
        if is_manifest:
            info, tokens = _manifest_info(args.file)
        else:
            header = snapshot.inspect(args.file)
            info, tokens = header.to_dict(), list(header.tokens)
    except FileNotFoundError:
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.json:
        if args.tokens:
            info["tokens"] = tokens
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if args.tokens or len(tokens) <= _SHOWN_TOKENS:
        shown = " ".join(map(str, tokens))
    else:
        shown = " ".join(map(str, tokens[:_SHOWN_TOKENS])) + f" ... ({len(tokens)} in all)"
    print(f"{'tokens':<{width}}  {shown}")
    return 0


def _manifest_info(path: Path) -> tuple[dict[str, Any], list[int]]:
    """What a chunk store's manifest records (its chunk files are not read: ``verify`` on the
    store checks them)."""
    man = Manifest.from_bytes(path.read_bytes(), source=str(path))
    info: dict[str, Any] = {
        "kind": "chunk store manifest",
        "session_id": man.session_id,
        "generation": man.generation,
        "journal_seq": man.journal_seq,
        "pos_min": man.pos_min,
        "n_tokens": man.n_tokens,
        "chunk_tokens": man.chunk_tokens,
        "chunks": len(man.refs),
        "bytes": man.file_size,
        "created_ns": man.created_ns,
        **dataclasses.asdict(man.identity),  # flat, as a snapshot's header prints it
    }
    return info, list(man.tokens)


def _is_chunk_store(path: Path) -> bool:
    return (path / "manifests").is_dir() or (path / "chunks").is_dir()


def _chunk_stores(directory: Path) -> list[Path]:
    """``directory`` itself and every directory below it that is a chunk store."""
    found = [directory] if _is_chunk_store(directory) else []
    for sub in sorted(directory.rglob("manifests")):
        root = sub.parent
        if not sub.is_dir() or root == directory or root in found:
            continue
        # below the top level, only a directory that looks like a chunk store counts
        if (root / "chunks").is_dir() or any(sub.rglob("*.kvman")):
            found.append(root)
    return found


def _targets(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(plain snapshot files, chunk store roots) to check."""
    files: list[Path] = []
    stores: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        roots = _chunk_stores(path)
        stores.extend(roots)
        inside = [root / "chunks" for root in roots] + [root / "quarantine" for root in roots]
        for file in snapshot.iter_snapshot_files(path):
            if not any(file.is_relative_to(d) for d in inside):
                files.append(file)
    return files, stores


def _verify_chunk_store(root: Path, quiet: bool) -> tuple[int, int]:
    """Check one chunk store; print what is wrong; return (items checked, damaged)."""
    report = ChunkStore(root, readonly=True).verify()
    for path, why in report.damaged_manifests:
        print(f"DAMAGED {path}: manifest: {why}")
    for key, why in report.damaged_chunks:
        print(f"DAMAGED {root}: chunk {key}: {why}")
    for path, key in report.missing:
        print(f"MISSING {root}: chunk {key}, named by {path}")
    for key in report.orphans:
        print(f"ORPHAN {root}: chunk {key} (no manifest names it; harmless)")
    damaged = len(report.damaged_manifests) + len(report.damaged_chunks) + len(report.missing)
    if not quiet and report.ok:
        print(
            f"OK {root}: chunk store, {report.manifests} manifests, {report.chunks} chunks, "
            f"{len(report.orphans)} orphans"
        )
    return report.manifests + report.chunks, damaged


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify every file (directories are walked for ``*.kvsnap``); exit 1 on any damage."""
    missing = [path for path in args.paths if not path.exists()]
    for path in missing:
        print(f"error: {path}: no such file or directory", file=sys.stderr)
    if missing:
        return 2
    damaged = 0
    files, stores = _targets(args.paths)
    checked = len(files)
    for root in stores:
        n, bad = _verify_chunk_store(root, args.quiet)
        checked += n
        damaged += bad
    for path in files:
        try:
            header = snapshot.verify(path)
        except CorruptSnapshotError as exc:
            damaged += 1
            print(f"DAMAGED {path}: field {exc.field}: {exc}")
            continue
        except UnsupportedVersionError as exc:
            damaged += 1
            print(f"DAMAGED {path}: field version: {exc}")
            continue
        except OSError as exc:
            damaged += 1
            print(f"DAMAGED {path}: unreadable: {exc.strerror or exc}")
            continue
        if not args.quiet:
            print(
                f"OK {path}: seq {header.seq_id}, {header.n_tokens} tokens, "
                f"{header.raw_size} -> {header.file_size} bytes"
            )
    if not files and not stores:
        where = ", ".join(str(path) for path in args.paths)
        print(f"no snapshot files found in {where}: nothing to verify", file=sys.stderr)
    elif not args.quiet or damaged:
        print(f"{checked} checked, {damaged} damaged", file=sys.stderr)
    return 1 if damaged else 0
