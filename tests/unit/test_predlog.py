"""The prediction log's group commit: an append returns only after an fsync that covers it, concurrent appends
share fsyncs, and no acknowledged record is missing after writers (threads, processes) are killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipelines.state import predlog
from pipelines.state.predlog import PredictionLog, PredictionRecord, log_entry, read_prediction_log, to_line, to_lines

REPO = Path(__file__).resolve().parents[2]
# a writer process: 4 threads append one record at a time and print each id once append returned (acknowledged)
WRITER = """
import sys, threading
from pathlib import Path
from pipelines.state.predlog import PredictionLog, PredictionRecord
log, lock = PredictionLog(Path(sys.argv[1])), threading.Lock()
def write(t):
    for i in range(100_000):
        log.append([PredictionRecord(request_id=f"{sys.argv[2]}-{t}-{i}", features={"x": i})])
        with lock:
            print(f"{sys.argv[2]}-{t}-{i}", flush=True)
for t in range(4):
    threading.Thread(target=write, args=(t,)).start()
"""


def test_concurrent_appends_share_fsyncs_and_return_only_once_covered(tmp_path, monkeypatch):
    log = PredictionLog(tmp_path)
    real_fsync, calls, durable = os.fsync, [], set()

    def slow_fsync(fd: int) -> None:  # a slow disk: what is in the file when the fsync begins is what it covers
        covered = {r.request_id for r in read_prediction_log(tmp_path)}
        calls.append(len(covered))
        time.sleep(0.01)
        real_fsync(fd)
        durable.update(covered)

    monkeypatch.setattr(predlog.os, "fsync", slow_fsync)
    early: list[str] = []

    def writer(t: int) -> None:
        for i in range(15):
            rid = f"{t}-{i}"
            log.append([PredictionRecord(request_id=rid), PredictionRecord(request_id=rid)])
            if rid not in durable:
                early.append(rid)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not early  # every append returned after an fsync that began once its rows were written
    logged = [r.request_id for r in read_prediction_log(tmp_path)]
    assert sorted(logged) == sorted(f"{t}-{i}" for t in range(8) for i in range(15) for _ in range(2))
    assert len(calls) < 8 * 15 / 2, len(calls)  # 120 appends: one fsync covered several of them


def test_a_new_day_goes_to_a_new_file_and_a_removed_file_is_made_again(tmp_path, monkeypatch):
    log = PredictionLog(tmp_path)
    log.append([PredictionRecord(request_id="a")])
    real = predlog.datetime

    class Tomorrow:
        @staticmethod
        def now(tz: object) -> object:
            return real(2999, 1, 2, tzinfo=predlog.UTC)

    monkeypatch.setattr(predlog, "datetime", Tomorrow)
    log.append([PredictionRecord(request_id="b")])
    assert len(list(tmp_path.glob("*.jsonl"))) == 2
    tomorrow = next(tmp_path.glob("2999-01-02-*.jsonl"))
    tomorrow.unlink()  # an operator cleaning up while the server runs: the next append writes a new file
    log.append([PredictionRecord(request_id="c")])
    assert [r.request_id for r in read_prediction_log(tmp_path)] == ["a", "c"]  # today's file sorts first
    assert oct(tomorrow.stat().st_mode & 0o777) == "0o640"


def test_no_acknowledged_record_is_missing_after_two_writer_processes_are_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name], stdout=subprocess.PIPE,
                                env=env, text=True) for name in ("p", "q")]
    acked: list[str] = []
    try:
        for writer in writers:  # both write at once into the same folder; killed mid-stream, after 300 acks
            assert writer.stdout is not None
            acked += [writer.stdout.readline().strip() for _ in range(300)]
        for writer in writers:
            writer.send_signal(signal.SIGKILL)
            assert writer.stdout is not None
            acked += [line.strip() for line in writer.stdout]  # acknowledged before the kill, not yet read
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # a file per process: never two writers on one file
    logged = {r.request_id for r in read_prediction_log(tmp_path)}  # a torn last line (not acked) is skipped
    assert all(acked) and len(acked) >= 600
    assert set(acked) <= logged, sorted(set(acked) - logged)[:5]


def test_writes_are_made_durable_off_the_event_loop_by_one_shared_fsync(tmp_path, monkeypatch):
    log, fsyncs = PredictionLog(tmp_path), []
    monkeypatch.setattr(predlog.os, "fsync", lambda fd: fsyncs.append(fd))
    log.write([PredictionRecord(request_id="a")])
    log.write([PredictionRecord(request_id="b")])
    assert not fsyncs  # a batch does not wait for the disk

    async def answers() -> None:
        await asyncio.gather(log.synced(), log.synced(), log.synced())

    asyncio.run(answers())
    assert len(fsyncs) == 1  # one fsync covered both writes for all three waiters
    asyncio.run(log.synced())
    assert len(fsyncs) == 1  # nothing new written: nothing to sync
    assert [r.request_id for r in read_prediction_log(tmp_path)] == ["a", "b"]


def test_an_answer_written_during_an_fsync_waits_for_the_next_one_and_a_failed_sync_fails_its_waiters(tmp_path):
    log, began, release, synced = PredictionLog(tmp_path), threading.Event(), threading.Event(), []
    real_sync = log.sync

    def slow_sync(ticket: int) -> None:
        began.set()
        release.wait(5)
        if ticket == 3:
            raise OSError("disk gone")
        real_sync(ticket)
        synced.append(ticket)

    log.sync = slow_sync  # type: ignore[method-assign]

    async def answers() -> list[BaseException | None]:
        log.write([PredictionRecord(request_id="a")])
        first = asyncio.ensure_future(log.synced())
        await asyncio.to_thread(began.wait, 5)  # the first fsync has begun: a write now is not covered by it
        log.write([PredictionRecord(request_id="b")])
        second = asyncio.ensure_future(log.synced())
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, second)
        log.write([PredictionRecord(request_id="c")])
        failed = await asyncio.gather(log.synced(), log.synced(), return_exceptions=True)
        return list(failed)

    failed = asyncio.run(answers())
    assert synced == [1, 2]  # the second answer waited for a sync of its own write
    assert [type(e) for e in failed] == [OSError, OSError]  # every answer the failed sync covered gets its error


def test_entries_encoded_together_are_the_lines_of_each_whatever_their_text():
    tricky = ['},{"time":1}', "a\nb", "ünï", '"quoted"', "\\"]
    entries = [log_entry(time=f"t{i}", answer={"label": "x", "probabilities": {"x": 0.5, "y": 0.5}, "probability": 0.5},
                         model_version="v", request_id=text, key_name=None, route="champion", id=i,
                         features={"time": text, "amount": float("nan") if i == 1 else 1.5, "n": np.float32(2.5)})
               for i, text in enumerate(tricky)]
    entries.append({"time": "t", "shadow": [{"time": 1}, {"time": 2}]})  # a list of objects: still one line
    entries.append({"request_id": "no time first"})
    for chosen in (entries, entries[:5], entries[:1], []):
        lines = to_lines(chosen)
        assert lines == b"".join(to_line(e) for e in chosen)
        assert len(lines.splitlines()) == len(chosen)
