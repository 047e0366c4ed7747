"""What a run does with ``--dataset`` (and ``--tokenizer``) before it opens the shards.

A run's data path is ``resolve_dataset`` then ``TokenDataset.open`` (albor.run_setup.open_data);
these tests call the first directly, on every rank-free case.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer

from albor.data.prepare import main as prepare
from albor.data.resolve import RunIndex, cache_lock, resolve_dataset, run_index
from albor.data.shards import open_tokens, read_header
from albor.data.tokenizer import EOS_TOKEN, load_tokenizer
from albor.errors import AlborError, ConfigError, DataError, ExitCode

DOCS = ["plain text document\nsecond line\n", "def g():\n    return 'ü ✓'\n", "first json doc", "second\njson doc"]


def make_tokenizer(directory: Path, texts: list[str]) -> Path:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 10, vocab_size=300, special_tokens=[EOS_TOKEN], show_progress=False)
    directory.mkdir(parents=True)
    bpe.save_model(str(directory))
    return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok", ["import os\nprint(os.getcwd())\n", "hello world\n"])


def make_corpus(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "b.py").write_text(DOCS[1])
    (root / "sub" / "c.jsonl").write_text(json.dumps({"text": DOCS[2]}) + "\n" + json.dumps({"text": DOCS[3]}) + "\n")
    return root


def decode_docs(dataset: Path, tok_dir: Path) -> list[str]:
    tok, index = load_tokenizer(tok_dir), json.loads((dataset / "index.json").read_text())
    ids = [int(t) for s in index["shards"] for t in open_tokens(dataset / s["name"], read_header(dataset / s["name"]))]
    assert ids[-1] == tok.eos_id
    docs, cur = [], []
    for t in ids:
        if t == tok.eos_id:
            docs.append(tok.backend.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root (directories as None), to compare a directory before and after."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ---- prepared datasets and plain errors -----------------------------------------------------------


def test_resolve_index_and_directory(tmp_path: Path, tok_dir: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    assert prepare([str(corpus), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "ds")]) == 0
    index = tmp_path / "ds" / "index.json"
    assert resolve_dataset(index, None, tmp_path / "run", log=print) == index
    assert resolve_dataset(tmp_path / "ds", None, tmp_path / "run", log=print) == index
    assert resolve_dataset(tmp_path / "ds", tok_dir, tmp_path / "run", log=print) == index  # the same tokenizer
    assert not (tmp_path / "run").exists()


def test_resolve_errors(tmp_path: Path, tok_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    with pytest.raises(ConfigError, match="--tokenizer"):
        resolve_dataset(tmp_path / "corpus", None, tmp_path / "run", log=print)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_dataset(tmp_path / "nope", tok_dir, tmp_path / "run", log=print)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        resolve_dataset(tmp_path / "empty", tok_dir, tmp_path / "run", log=print)
    assert not (tmp_path / "run").exists()


def test_another_tokenizer_with_a_prepared_dataset_is_refused(tmp_path: Path, tok_dir: Path) -> None:
    """README: the tokenizer's sha256 in index.json is checked when a run opens a dataset."""
    corpus = make_corpus(tmp_path / "corpus")
    assert prepare([str(corpus), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "ds")]) == 0
    other = make_tokenizer(tmp_path / "other", ["completely different text\n"])
    with pytest.raises(DataError) as info:
        resolve_dataset(tmp_path / "ds", other, tmp_path / "run", log=print)
    msg = str(info.value)
    assert info.value.exit_code == ExitCode.DATA
    assert str(tmp_path / "ds" / "index.json") in msg and str(other) in msg
    assert load_tokenizer(other).sha256 in msg and load_tokenizer(tok_dir).sha256 in msg
    assert "drop --tokenizer" in msg and "\n" not in msg
    (other / "merges.txt").unlink()  # a broken --tokenizer is refused too, even though a prepared dataset needs none
    with pytest.raises(DataError, match="merges.txt is missing"):
        resolve_dataset(tmp_path / "ds", other, tmp_path / "run", log=print)
    assert not (tmp_path / "run").exists()


# ---- the raw-corpus cache -------------------------------------------------------------------------


def test_resolve_raw_corpus_caches_once(tmp_path: Path, tok_dir: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    logs: list[str] = []
    run = tmp_path / "run"
    p = resolve_dataset(corpus, tok_dir, run, log=logs.append)
    assert p == run / "data-cache" / "index.json" and any("tokenizing" in m for m in logs)
    assert sorted(decode_docs(p.parent, tok_dir)) == sorted(DOCS)
    assert sorted(q.name for q in run.iterdir()) == ["data-cache"]  # no lock file, no staging left
    mtime = p.stat().st_mtime_ns
    logs.clear()
    assert resolve_dataset(corpus, tok_dir, run, log=logs.append) == p
    assert p.stat().st_mtime_ns == mtime and "reusing" in logs[0]
    (corpus / "a.txt").write_text("changed document\n")
    logs.clear()
    resolve_dataset(corpus, tok_dir, run, log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert "changed document\n" in decode_docs(p.parent, tok_dir)
    assert sorted(q.name for q in run.iterdir()) == ["data-cache"]


def test_run_index_names_the_index_resolve_trains_on(tmp_path: Path, tok_dir: Path) -> None:
    """The one rule albor export also follows to find a run's dataset (albor.export.run_tokenizer)."""
    corpus = make_corpus(tmp_path / "corpus")
    one_file = corpus / "sub" / "c.jsonl"  # a raw corpus of one file: a .jsonl is not an index
    run = tmp_path / "run"
    assert run_index(one_file, run) == RunIndex(run / "data-cache" / "index.json", cached=True)
    assert resolve_dataset(one_file, tok_dir, run, log=print) == run_index(one_file, run).path
    assert prepare([str(corpus), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "ds")]) == 0
    for dataset in (tmp_path / "ds", tmp_path / "ds" / "index.json"):
        assert run_index(dataset, run) == RunIndex(tmp_path / "ds" / "index.json", cached=False)
        assert resolve_dataset(dataset, None, run, log=print) == run_index(dataset, run).path


BAD_CORPORA = {
    "empty": (lambda root: (root / "a.txt").write_text(""), "{corpus} holds no text"),
    "not-utf8": (lambda root: (root / "b.txt").write_bytes(b"caf\xe9 and more"), "{corpus}/b.txt is not UTF-8"),
    "one-document": (lambda root: (root / "a.txt").write_text("only one"), "{corpus} holds a single document"),
    "bad-jsonl": (lambda root: (root / "c.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n'), "{corpus}/c.jsonl:2"),
}


def write_bad_corpus(root: Path, kind: str) -> Path:
    root.mkdir()
    (root / "ok.txt").write_text("a fine document\n")
    if kind in ("empty", "one-document"):
        (root / "ok.txt").unlink()
    BAD_CORPORA[kind][0](root)
    return root


@pytest.fixture(params=[True, False], ids=["precheck", "while-tokenizing"])
def where_it_fails(request, monkeypatch) -> bool:
    """Bad input is found by the cheap pass before tokenizing; without it, by tokenizing itself.
    Either way nothing may be left behind."""
    if not request.param:
        monkeypatch.setattr("albor.data.resolve.check_documents", lambda *a, **k: None)
    return request.param


@pytest.mark.parametrize("kind", sorted(BAD_CORPORA))
def test_a_corpus_that_fails_to_tokenize_leaves_no_run_directory(tmp_path: Path, tok_dir: Path, kind: str,
                                                                   where_it_fails: bool) -> None:
    corpus = write_bad_corpus(tmp_path / "corpus", kind)
    run = tmp_path / "runs" / "new" / "run-1"
    with pytest.raises(DataError) as info:
        resolve_dataset(corpus, tok_dir, run, log=print)
    msg = str(info.value)
    assert info.value.exit_code == ExitCode.DATA
    assert BAD_CORPORA[kind][1].format(corpus=corpus) in msg  # the user's file or directory...
    assert "data-cache" not in msg and "--val-fraction" not in msg  # ...not the cache, no flag pretrain lacks
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", sorted(BAD_CORPORA))
def test_a_corpus_that_fails_to_tokenize_leaves_an_existing_run_directory_unchanged(
        tmp_path: Path, tok_dir: Path, kind: str, where_it_fails: bool) -> None:
    run = tmp_path / "run"
    resolve_dataset(make_corpus(tmp_path / "good"), tok_dir, run, log=print)  # an earlier cache, now stale
    (run / "notes.txt").write_text("mine")
    before = tree(run)
    with pytest.raises(DataError):
        resolve_dataset(write_bad_corpus(tmp_path / "corpus", kind), tok_dir, run, log=print)
    assert tree(run) == before


def test_a_run_directory_that_cannot_be_made_is_a_usage_error(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        resolve_dataset(make_corpus(tmp_path / "corpus"), tok_dir, tmp_path / "file" / "run", log=print)
    assert info.value.exit_code == ExitCode.USAGE and "--output-dir" in str(info.value)
    assert (tmp_path / "file").read_text() == "x"


# ---- several ranks at once ------------------------------------------------------------------------


def test_cache_lock_excludes_a_waiter_and_a_late_comer(tmp_path: Path) -> None:
    """The holder removes the lock file on leaving: a waiter that held the old file must not run
    alongside a rank that arrives later and finds no file (flock is per open file, so threads do)."""
    run = tmp_path / "runs" / "run-1"
    inside: list[str] = []
    overlaps: list[tuple[str, str]] = []
    first_in, waiter_queued = threading.Event(), threading.Event()

    def hold(name: str, seconds: float, entered: threading.Event | None = None) -> None:
        with cache_lock(run):
            if inside:
                overlaps.append((inside[0], name))
            inside.append(name)
            if entered:
                entered.set()
            time.sleep(seconds)
            inside.remove(name)

    first = threading.Thread(target=hold, args=("first", 0.3, first_in))
    first.start()
    assert first_in.wait(10)
    waiter = threading.Thread(target=lambda: (waiter_queued.set(), hold("waiter", 0.5)))
    waiter.start()  # opens the first's lock file and waits on it
    assert waiter_queued.wait(10)
    first.join()
    time.sleep(0.15)  # the waiter is inside by now; a late rank arrives
    hold("late", 0.0)
    waiter.join()
    assert overlaps == [] and inside == []
    assert not (tmp_path / "runs").exists()  # each left only empty directories, and removed them

def run_ranks(corpus: Path, tok_dir: Path, run: Path, monkeypatch: pytest.MonkeyPatch, n: int = 3) -> list[dict]:
    """``n`` ranks resolving at once (threads: flock excludes open files, not processes)."""
    import albor.data.resolve as resolve

    check = resolve.check_documents

    def slow_check(*args, **kwargs):  # hold the cache lock long enough for the other ranks to queue on it
        time.sleep(0.3)
        return check(*args, **kwargs)

    monkeypatch.setattr(resolve, "check_documents", slow_check)
    start = threading.Barrier(n)
    outs: list[dict] = [{} for _ in range(n)]

    def rank(r: int) -> None:
        logs: list[str] = []
        start.wait()
        try:
            outs[r] = {"path": str(resolve_dataset(corpus, tok_dir, run, log=logs.append)), "logs": logs}
        except AlborError as e:
            outs[r] = {"error": str(e), "code": int(e.exit_code)}

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outs


def test_ranks_tokenize_a_raw_corpus_once(tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "runs" / "run-1"
    outs = run_ranks(make_corpus(tmp_path / "corpus"), tok_dir, run, monkeypatch)
    assert {o["path"] for o in outs} == {str(run / "data-cache" / "index.json")}
    assert sum(any("tokenizing" in m for m in o["logs"]) for o in outs) == 1
    assert sum(any("reusing" in m for m in o["logs"]) for o in outs) == 2
    assert sorted(q.name for q in run.iterdir()) == ["data-cache"]  # the lock file went with the last rank


def test_ranks_that_all_fail_leave_nothing(tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_bad_corpus(tmp_path / "corpus", "not-utf8")
    outs = run_ranks(corpus, tok_dir, tmp_path / "runs" / "run-1", monkeypatch)
    assert all(o.get("code") == ExitCode.DATA and "b.txt is not UTF-8" in o["error"] for o in outs), outs
    assert not (tmp_path / "runs").exists()


def test_leftovers_of_a_killed_rank_are_cleared(tmp_path: Path, tok_dir: Path) -> None:
    run = tmp_path / "run"
    (run / ".data-cache.staging-x1y2" / "tokenizer").mkdir(parents=True)  # killed while tokenizing
    (run / ".data-cache.staging-x1y2" / "train-00000.bin").write_bytes(b"half")
    (run / ".data-cache.old-z3").mkdir()  # killed while swapping
    (run / ".data-cache.lock").write_text("")
    resolve_dataset(make_corpus(tmp_path / "corpus"), tok_dir, run, log=print)
    assert sorted(q.name for q in run.iterdir()) == ["data-cache"]


def test_a_run_directory_inside_the_raw_corpus_is_refused(tmp_path: Path, tok_dir: Path) -> None:
    """Its metrics.jsonl would be read as a corpus file by the next run on the same corpus."""
    corpus = make_corpus(tmp_path / "corpus")
    with pytest.raises(ConfigError) as info:
        resolve_dataset(corpus, tok_dir, corpus / "runs" / "r1", log=print)
    assert info.value.exit_code == ExitCode.USAGE and "outside the corpus" in str(info.value)
    assert not (corpus / "runs").exists()


# ---- who reads the corpus, and how long a rank waits ------------------------------------------------


def count_content_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every full read of the corpus for its content hash, as the number of files read."""
    import albor.data.resolve as resolve

    calls: list[int] = []
    real = resolve.corpus_fingerprint
    monkeypatch.setattr(resolve, "corpus_fingerprint", lambda files, *a: calls.append(len(files)) or real(files, *a))
    return calls


def test_only_the_rank_that_builds_the_cache_reads_the_corpus(tmp_path: Path, tok_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_content_hashes(monkeypatch)
    outs = run_ranks(make_corpus(tmp_path / "corpus"), tok_dir, tmp_path / "run", monkeypatch)
    assert all("path" in o for o in outs), outs
    assert hashed == [3]  # one rank hashed the 3 files; the other two compared stat signatures only


def test_an_untouched_corpus_is_never_read_again_and_a_touched_one_once(tmp_path: Path, tok_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    corpus, run = make_corpus(tmp_path / "corpus"), tmp_path / "run"
    hashed = count_content_hashes(monkeypatch)
    index = resolve_dataset(corpus, tok_dir, run, log=print)
    shards_before = {p.name: p.read_bytes() for p in index.parent.glob("*.bin")}
    assert hashed == [3]
    logs: list[str] = []
    resolve_dataset(corpus, tok_dir, run, log=logs.append)
    assert hashed == [3] and "files are unchanged" in logs[0]
    st = (corpus / "b.py").stat()
    os.utime(corpus / "b.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, another time
    logs.clear()
    resolve_dataset(corpus, tok_dir, run, log=logs.append)
    assert hashed == [3, 3] and "same content" in logs[0]
    assert {p.name: p.read_bytes() for p in index.parent.glob("*.bin")} == shards_before  # reused, not rebuilt
    logs.clear()
    resolve_dataset(corpus, tok_dir, run, log=logs.append)  # the new signature was recorded
    assert hashed == [3, 3] and "files are unchanged" in logs[0]


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path, tok_dir: Path) -> None:
    """ctime is part of the signature: restoring the mtime after a write cannot hide the write."""
    import os

    corpus, run = make_corpus(tmp_path / "corpus"), tmp_path / "run"
    index = resolve_dataset(corpus, tok_dir, run, log=print)
    st = (corpus / "a.txt").stat()
    (corpus / "a.txt").write_text(DOCS[0].upper())  # the same length
    os.utime(corpus / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (corpus / "a.txt").stat().st_size == st.st_size and (corpus / "a.txt").stat().st_mtime_ns == st.st_mtime_ns
    logs: list[str] = []
    resolve_dataset(corpus, tok_dir, run, log=logs.append)
    assert any("rebuilding" in m for m in logs), logs
    assert DOCS[0].upper() in decode_docs(index.parent, tok_dir)


def test_a_rank_waits_for_the_cache_at_most_the_timeout(tmp_path: Path, tok_dir: Path) -> None:
    corpus, run = make_corpus(tmp_path / "corpus"), tmp_path / "run"
    inside, leave = threading.Event(), threading.Event()

    def builder() -> None:  # another rank, tokenizing for longer than this one may wait
        with cache_lock(run):
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=builder)
    t.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        with pytest.raises(DataError) as info:
            resolve_dataset(corpus, tok_dir, run, log=print, lock_timeout_s=0.5)
        waited = time.monotonic() - started
    finally:
        leave.set()
        t.join(10)
    assert info.value.exit_code == ExitCode.DATA
    msg = str(info.value)
    assert "waited 0.5 s for another rank to tokenize" in msg and ".data-cache.lock" in msg and "prepare-data" in msg
    assert 0.5 <= waited < 10  # gave up, rather than waiting for the builder


def test_the_stat_signature_opens_each_file_so_nfs_revalidates_it(tmp_path: Path, monkeypatch) -> None:
    """An NFS client may answer a path's stat from its attribute cache; an open makes it ask the server."""
    import os

    from albor.data import resolve

    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    for f in files:
        f.write_text("x\n")
    real_open = os.open
    opened: list[str] = []

    def spy_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    before = resolve.corpus_signature(files, "0" * 64, 0.02)
    assert opened == [str(f) for f in files]
    monkeypatch.undo()
    files[0].write_text("y\n")  # same size, new mtime and ctime
    assert resolve.corpus_signature(files, "0" * 64, 0.02) != before
