"""A server killed with SIGKILL in the middle of a batch job resumes it after a restart, and
every custom_id appears exactly once across the output and error files."""

from __future__ import annotations

import pytest

from tests.e2e.batch_support import (  # noqa: F401 - fixtures
    ServerProcess,
    assert_each_once,
    batch_store,
    chat_line,
    client,
    postgres,
    read_results,
    upload,
    wait_batch,
    write_config,
)

NUM_LINES = 400


@pytest.mark.slow
def test_sigkill_mid_job_then_restart_completes_each_line_once(batch_store, tmp_path):
    cfg = tmp_path / "server.toml"
    # Real-time simulated fleet, a few lines in flight: the job takes seconds, so the kill
    # lands with some lines committed, some in flight and most not started.
    write_config(cfg, batch_store, speedup=10.0, max_lines_in_flight=8)
    srv = ServerProcess(cfg, tmp_path / "server.log")
    srv.start()
    try:
        _crash_and_resume(srv)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- server log ---\n"
                             f"{srv.log_path.read_text()[-4000:]}") from None
    finally:
        srv.stop()


def _crash_and_resume(srv: ServerProcess) -> None:
    """Upload, start a job, SIGKILL the server mid-job, restart it, check the results."""
    c = client(srv)
    f = upload(c, [chat_line(i, max_tokens=16) for i in range(NUM_LINES)])
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="24h")
    mid = wait_batch(c, b.id, until=lambda x: x.request_counts.completed >= 40,
                     timeout_s=90)
    srv.kill()
    assert mid.status == "in_progress"
    assert mid.request_counts.completed < NUM_LINES

    srv.start()  # same config, same store: the job resumes
    c = client(srv)
    after = c.batches.retrieve(b.id)
    assert after.request_counts.completed >= mid.request_counts.completed  # none lost
    done = wait_batch(c, b.id, timeout_s=120)
    assert done.status == "completed", done
    assert done.request_counts.completed == NUM_LINES
    assert done.request_counts.failed == 0
    out, err = read_results(c, done)
    assert err == []
    assert_each_once([f"req-{i}" for i in range(NUM_LINES)], out, err)
    # output lines come in input order, one per line
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(NUM_LINES)]
