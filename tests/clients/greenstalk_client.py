#!/usr/bin/env python3
"""Drive a beanstalk server through greenstalk, a third-party client library.

Usage: greenstalk_client.py HOST PORT

Expects a fresh server. Runs every check, prints one line per check, and
exits 0 only if all of them passed (1 otherwise, 2 on bad usage).
tests/third_party.rs runs it against polarisd (and, for a self-check,
against beanstalkd).
"""

import socket
import sys
import time
import traceback

import greenstalk

# Every socket gets this timeout, so a server that stops answering makes the
# script fail instead of hang.
SOCKET_TIMEOUT = 10.0


def connect(address, **kwargs):
    sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT)
    return greenstalk.Client(sock, **kwargs)


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def expect_raises(error_type, action):
    try:
        action()
    except error_type:
        return
    except Exception as other:  # report the wrong error, not a traceback
        raise AssertionError(f"expected {error_type.__name__}, got {other!r}")
    raise AssertionError(f"expected {error_type.__name__}, got no error")


def drain(client, tubes):
    """Delete every job left in `tubes` so checks do not see each other's jobs."""
    for tube in tubes:
        client.use(tube)
        for peek in (client.peek_ready, client.peek_delayed, client.peek_buried):
            while True:
                try:
                    client.delete(peek())
                except greenstalk.NotFoundError:
                    break
    client.use("default")


def check_put_reserve_delete(c):
    job_id = c.put("hello")
    expect(isinstance(job_id, int) and job_id >= 1, f"put returned {job_id!r}")
    job = c.reserve(timeout=1)
    expect((job.id, job.body) == (job_id, "hello"), f"reserved {job.id} {job.body!r}")
    c.delete(job)
    expect_raises(greenstalk.NotFoundError, lambda: c.delete(job))
    expect_raises(greenstalk.TimedOutError, lambda: c.reserve(timeout=0))


def check_binary_body(address):
    raw = connect(address, encoding=None)
    try:
        body = b"\x00\r\n\xff binary \r\n"
        job_id = raw.put(body)
        job = raw.reserve(timeout=1)
        expect((job.id, job.body) == (job_id, body), f"binary body came back as {job.body!r}")
        raw.delete(job)
    finally:
        raw.close()


def check_priority_order(c):
    low = c.put("low", priority=500)
    high = c.put("high", priority=1)
    same = c.put("same-as-high", priority=1)
    order = [c.reserve(timeout=1) for _ in range(3)]
    expect([j.id for j in order] == [high, same, low], f"order {[j.id for j in order]}")
    for job in order:
        c.delete(job)


def check_release_and_delay(c):
    c.put("again", priority=7)
    job = c.reserve(timeout=1)
    c.release(job, priority=3)
    stats = c.stats_job(job)
    expect(stats["state"] == "ready" and stats["pri"] == 3 and stats["releases"] == 1, f"after release: {stats}")
    job = c.reserve(timeout=1)
    c.release(job, delay=1)
    expect(c.stats_job(job)["state"] == "delayed", "release with delay should delay")
    expect(c.peek_delayed().id == job.id, "peek_delayed should show the released job")
    expect_raises(greenstalk.TimedOutError, lambda: c.reserve(timeout=0))
    job = c.reserve(timeout=3)  # ready again after about a second
    expect(job.body == "again", f"delayed job body {job.body!r}")
    c.delete(job)


def check_bury_and_kick(c):
    first = c.put("one")
    second = c.put("two")
    for _ in range(2):
        c.bury(c.reserve(timeout=1), priority=9)
    expect(c.peek_buried().id == first, "peek_buried should show the first buried job")
    expect(c.stats_job(second)["state"] == "buried", "second job should be buried")
    expect(c.kick(1) == 1, "kick 1 should kick one job")
    expect(c.stats_job(first)["state"] == "ready", "kicked job should be ready")
    c.kick_job(second)
    expect(c.stats_job(second)["buries"] == 1 and c.stats_job(second)["kicks"] == 1, "kick counters")
    expect(c.kick(10) == 0, "nothing left to kick")
    expect_raises(greenstalk.NotFoundError, lambda: c.kick_job(second))
    drain(c, ["default"])


def check_delayed_kick(c):
    job_id = c.put("later", delay=100)
    expect(c.peek_delayed().id == job_id, "peek_delayed")
    expect_raises(greenstalk.NotFoundError, c.peek_ready)
    expect(c.kick(5) == 1, "kick should move the delayed job")
    expect(c.peek_ready().id == job_id, "kicked delayed job should be ready")
    drain(c, ["default"])


def check_peek(c):
    job_id = c.put("peeked")
    job = c.peek(job_id)
    expect((job.id, job.body) == (job_id, "peeked"), "peek by id")
    expect(c.peek_ready().id == job_id, "peek_ready")
    expect_raises(greenstalk.NotFoundError, lambda: c.peek(job_id + 1000))
    expect_raises(greenstalk.NotFoundError, c.peek_buried)
    c.delete(job_id)


def check_tubes(c, address):
    c.use("emails")
    expect(c.using() == "emails", f"using {c.using()!r}")
    job_id = c.put("to-emails")
    expect(c.stats_job(job_id)["tube"] == "emails", "job should be in the used tube")
    expect_raises(greenstalk.TimedOutError, lambda: c.reserve(timeout=0))
    expect(c.watch("emails") == 2, "watching two tubes")
    expect(c.ignore("default") == 1, "watching one tube")
    expect(c.watching() == ["emails"], f"watching {c.watching()!r}")
    expect_raises(greenstalk.NotIgnoredError, lambda: c.ignore("emails"))
    expect("emails" in c.tubes(), f"tubes {c.tubes()!r}")
    job = c.reserve(timeout=1)
    expect(job.id == job_id, "reserved from the watched tube")
    c.delete(job)
    c.watch("default")
    c.ignore("emails")
    c.use("default")
    other = connect(address)
    try:
        expect(other.tubes() == ["default"], f"unused tube should vanish: {other.tubes()!r}")
    finally:
        other.close()
    watcher = connect(address, use="jobs", watch=["jobs", "more"])
    try:
        expect(watcher.using() == "jobs", "use= argument")
        expect(sorted(watcher.watching()) == ["jobs", "more"], f"watch= argument: {watcher.watching()!r}")
    finally:
        watcher.close()


def check_touch(c):
    c.put("slow", ttr=2)
    job = c.reserve(timeout=1)
    time.sleep(1.2)
    c.touch(job)
    time.sleep(1.2)
    expect(c.stats_job(job)["state"] == "reserved", "touch should have extended the TTR")
    c.delete(job)
    expect_raises(greenstalk.NotFoundError, lambda: c.touch(job))


def check_reserve_job(c):
    first = c.put("first")
    second = c.put("second")
    job = c.reserve_job(second)
    expect((job.id, job.body) == (second, "second"), "reserve_job picks the given job")
    expect_raises(greenstalk.NotFoundError, lambda: c.reserve_job(second))
    c.delete(job)
    c.delete(first)


def check_blocked_reserve_served_by_other_client(c, address):
    worker = connect(address)
    try:
        worker.watch("handoff")
        c.use("handoff")
        c.put("handed-over")
        c.use("default")
        job = worker.reserve(timeout=2)
        expect(job.body == "handed-over", "worker should get the job")
        worker.delete(job)
    finally:
        worker.close()


def check_stats(c):
    stats = c.stats()
    for key in ("current-jobs-ready", "cmd-put", "total-jobs", "current-connections", "uptime", "max-job-size"):
        expect(key in stats, f"stats lacks {key}")
    expect(stats["max-job-size"] == 65535, f"max-job-size {stats['max-job-size']}")
    expect(stats["cmd-put"] >= 1, "cmd-put should count earlier puts")
    # Client libraries parse `version` as a version number, as beanstalkd's "1.12" is.
    version = str(stats["version"])
    expect(version == "1.12", f"stats version {version!r} is not beanstalkd's")
    expect(tuple(int(part) for part in version.split(".")) == (1, 12), f"version {version!r} does not parse")
    tube = c.stats_tube("default")
    expect(tube["name"] == "default", f"stats_tube name {tube['name']!r}")
    expect_raises(greenstalk.NotFoundError, lambda: c.stats_tube("no-such-tube"))
    expect_raises(greenstalk.NotFoundError, lambda: c.stats_job(10**9))


def check_pause_tube(c):
    c.pause_tube("default", 1)
    c.put("paused")
    expect_raises(greenstalk.TimedOutError, lambda: c.reserve(timeout=0))
    expect(c.stats_tube("default")["pause"] == 1, "pause should be 1")
    job = c.reserve(timeout=3)
    expect(job.body == "paused", "job comes out once the pause ends")
    c.delete(job)


def check_errors(c):
    expect_raises(greenstalk.JobTooBigError, lambda: c.put("x" * 70000))
    expect_raises(greenstalk.NotFoundError, lambda: c.release(greenstalk.Job(999999, "")))
    expect_raises(greenstalk.NotFoundError, lambda: c.bury(greenstalk.Job(999999, "")))
    expect(c.put("still works") >= 1, "connection usable after errors")
    drain(c, ["default"])


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    address = (sys.argv[1], int(sys.argv[2]))
    client = connect(address)
    checks = [
        ("put, reserve, delete", lambda: check_put_reserve_delete(client)),
        ("binary body", lambda: check_binary_body(address)),
        ("priority order", lambda: check_priority_order(client)),
        ("release and delay", lambda: check_release_and_delay(client)),
        ("bury and kick", lambda: check_bury_and_kick(client)),
        ("kick a delayed job", lambda: check_delayed_kick(client)),
        ("peek", lambda: check_peek(client)),
        ("use, watch, ignore, tubes", lambda: check_tubes(client, address)),
        ("touch", lambda: check_touch(client)),
        ("reserve_job", lambda: check_reserve_job(client)),
        ("blocked reserve served by another client", lambda: check_blocked_reserve_served_by_other_client(client, address)),
        ("stats", lambda: check_stats(client)),
        ("pause_tube", lambda: check_pause_tube(client)),
        ("error replies", lambda: check_errors(client)),
    ]
    failed = 0
    for index, (name, check) in enumerate(checks):
        try:
            check()
            print(f"ok    {name}")
        except Exception:
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
            # A failed check may leave jobs behind or a broken connection:
            # start the next one from a clean, fresh connection.
            try:
                client.close()
            except Exception:
                pass
            try:
                client = connect(address)
                drain(client, ["default", "emails", "handoff"])
            except Exception as error:
                print(f"cannot reconnect: {error!r}; skipping the remaining checks")
                failed += len(checks) - index - 1
                break
    client.close()
    print(f"greenstalk: {len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
