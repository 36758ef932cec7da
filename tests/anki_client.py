"""Drive the real Anki sync client (the `anki` wheel's Rust client) from the command line.

Tests run each action in its own process: the client reads `SSL_CERT_FILE` when it builds its TLS
configuration, and a fresh process per action keeps the Rust backend's global state out of the
test runner. Every action prints one JSON object on stdout.

    python tests/anki_client.py build COLLECTION --notes 2000 --media 10
    python tests/anki_client.py login COLLECTION --endpoint URL --user NAME --password-stdin
    python tests/anki_client.py sync COLLECTION --endpoint URL --hkey KEY [--upload | --download]
    python tests/anki_client.py sync COLLECTION ... --start-at EPOCH  (wait, then sync: benchmarks)
    python tests/anki_client.py edit COLLECTION --count 50 --tag edited
    python tests/anki_client.py dump COLLECTION
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from anki.collection import AddNoteRequest, Collection
from anki.sync import SyncAuth
from anki.sync_pb2 import SyncCollectionResponse

ChangesRequired = SyncCollectionResponse.ChangesRequired
MEDIA_SYNC_TIMEOUT_SECONDS = 300


def media_bytes(index: int, size: int) -> bytes:
    """Return deterministic, poorly compressible media content for file number `index`."""
    seed = hashlib.sha256(f"media-{index}".encode()).digest()
    blocks = [hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
              for counter in range(size // 32 + 1)]
    return b"".join(blocks)[:size]


def build(args: argparse.Namespace) -> dict:
    col = Collection(args.collection)
    try:
        model = col.models.by_name("Basic")
        deck_id = col.decks.id("Default")
        media_names = []
        for index in range(args.media):
            name = col.media.write_data(f"picture-{index}.bin", media_bytes(index, args.media_size))
            media_names.append(name)
        notes = []
        for index in range(args.notes):
            note = col.new_note(model)
            note["Front"] = f"front {index} {args.label}"
            back = f"back {index}"
            if index < len(media_names):
                back += f' <img src="{media_names[index]}">'
            note["Back"] = back
            notes.append(note)
        # One call is one transaction: adding 20,000 notes one by one took minutes on a
        # loaded 2-core machine, in one call a few seconds.
        col.add_notes([AddNoteRequest(note, deck_id) for note in notes])
        return {"notes": col.note_count(), "media": media_names}
    finally:
        col.close()


def wait_until(start_at: float | None) -> float:
    """Sleep until the wall-clock time `start_at`, so that several clients start together.

    Returns the wall-clock time at which this process was ready, before sleeping; a value after
    `start_at` means the process started late.
    """
    ready = time.time()
    if start_at is not None and start_at > ready:
        time.sleep(start_at - ready)
    return ready


def login(args: argparse.Namespace) -> dict:
    password = sys.stdin.readline().rstrip("\n")
    col = Collection(args.collection)
    try:
        ready = wait_until(args.start_at)
        started = time.perf_counter()
        auth = col.sync_login(username=args.user, password=password, endpoint=args.endpoint)
        return {"hkey": auth.hkey, "seconds": time.perf_counter() - started, "ready": ready,
                "finished": time.time()}
    finally:
        col.close()


def wait_for_media(col: Collection) -> None:
    deadline = time.monotonic() + MEDIA_SYNC_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        # media_sync_status() raises if the background media sync failed.
        if not col.media_sync_status().active:
            return
        # Poll often: benchmarks time syncs whose media sync takes a few milliseconds.
        time.sleep(0.005)
    raise TimeoutError("media sync still running after %d s" % MEDIA_SYNC_TIMEOUT_SECONDS)


def sync(args: argparse.Namespace) -> dict:
    auth = SyncAuth(hkey=args.hkey, endpoint=args.endpoint)
    col = Collection(args.collection)
    ready = wait_until(args.start_at)
    started = time.perf_counter()
    try:
        out = col.sync_collection(auth, sync_media=False)
        required = ChangesRequired.Name(out.required)
        if out.new_endpoint:
            auth = SyncAuth(hkey=args.hkey, endpoint=out.new_endpoint)
        full = out.required in (
            ChangesRequired.FULL_SYNC,
            ChangesRequired.FULL_UPLOAD,
            ChangesRequired.FULL_DOWNLOAD,
        )
        if full:
            if out.required == ChangesRequired.FULL_UPLOAD:
                upload = True
            elif out.required == ChangesRequired.FULL_DOWNLOAD:
                upload = False
            elif args.upload or args.download:
                upload = bool(args.upload)
            else:
                raise SystemExit("full sync required: pass --upload or --download")
            col.close_for_full_sync()
            col.full_upload_or_download(auth=auth, server_usn=out.server_media_usn, upload=upload)
            col.reopen(after_full_sync=True)
        if not args.no_media:
            col.sync_media(auth)
            wait_for_media(col)
        seconds = time.perf_counter() - started
        return {"required": required, "notes": col.note_count(), "seconds": seconds,
                "ready": ready, "finished": time.time()}
    finally:
        col.close()


def edit(args: argparse.Namespace) -> dict:
    col = Collection(args.collection)
    try:
        note_ids = sorted(col.find_notes(""))[: args.count]
        for note_id in note_ids:
            note = col.get_note(note_id)
            note["Back"] = note["Back"] + f" {args.tag}"
            col.update_note(note)
        return {"edited": len(note_ids)}
    finally:
        col.close()


def dump(args: argparse.Namespace) -> dict:
    col = Collection(args.collection)
    try:
        notes = {}
        for note_id in col.find_notes(""):
            note = col.get_note(note_id)
            notes[str(note.guid)] = list(note.fields)
        media_dir = col.media.dir()
        media = {}
        for name in sorted(os.listdir(media_dir)):
            path = os.path.join(media_dir, name)
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    media[name] = hashlib.sha256(handle.read()).hexdigest()
        return {"notes": notes, "media": media}
    finally:
        col.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("build")
    p.add_argument("collection")
    p.add_argument("--notes", type=int, default=100)
    p.add_argument("--media", type=int, default=0)
    p.add_argument("--media-size", type=int, default=20_000)
    p.add_argument("--label", default="")
    p.set_defaults(action=build)

    p = commands.add_parser("login")
    p.add_argument("collection")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-stdin", action="store_true", required=True)
    p.add_argument("--start-at", type=float, help="wall-clock time (epoch seconds) to start at")
    p.set_defaults(action=login)

    p = commands.add_parser("sync")
    p.add_argument("collection")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--hkey", required=True)
    p.add_argument("--upload", action="store_true")
    p.add_argument("--download", action="store_true")
    p.add_argument("--no-media", action="store_true")
    p.add_argument("--start-at", type=float, help="wall-clock time (epoch seconds) to start at")
    p.set_defaults(action=sync)

    p = commands.add_parser("edit")
    p.add_argument("collection")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--tag", default="edited")
    p.set_defaults(action=edit)

    p = commands.add_parser("dump")
    p.add_argument("collection")
    p.set_defaults(action=dump)

    args = parser.parse_args()
    print(json.dumps(args.action(args)))


if __name__ == "__main__":
    main()
