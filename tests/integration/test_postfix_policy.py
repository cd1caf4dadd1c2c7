"""End to end through a real Postfix: smtpd asks ``postoffice policy`` at RCPT time.

A private Postfix instance takes ``postfix-examples/policy-main.cf`` as it is
written (``check_policy_service unix:postoffice/policy.sock`` first in
``smtpd_recipient_restrictions``, so that the test client on loopback is
asked about too), with ``postoffice serve`` and ``postoffice policy`` on
sockets in a setgid ``postfix`` folder of its queue directory, as
``docs/policy.md`` sets them up.  One message to a known and an unknown
recipient: the unknown one is refused in the client's own SMTP session,
the known one lands in its queue, and Postfix sends no bounce to anybody.
"""

from __future__ import annotations

import grp
import os
import re
from pathlib import Path

import pytest

from tests.helpers import Process, stored, uri_for, write_config
from tests.integration.postfix_instance import (
    PostfixInstance,
    main_cf_settings,
    make_traversable,
    require_root,
    require_tool,
)
from tests.integration.servers import (
    QUEUES,
    SENDER,
    WAIT,
    Serve,
    delivery_status,
    make_message,
    parse,
    socket_path,
    start_serve,
)

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "postfix-examples" / "policy-main.cf"
POSTOFFICE_DOMAINS = ("app.test", "other.test", "unknown.test")


def test_an_unknown_recipient_is_refused_at_rcpt_time_and_nothing_bounces(
    servers: list[Serve], tmp_path: Path
) -> None:
    require_tool("postfix")
    require_tool("postqueue")
    require_root()
    make_traversable(tmp_path)
    main_cf = main_cf_settings(EXAMPLE.read_text())
    assert (
        main_cf["smtpd_recipient_restrictions"]
        .strip()
        .startswith("check_policy_service unix:postoffice/policy.sock,")
    )

    # The sockets' folder in the instance's queue directory, group postfix, setgid.
    folder = tmp_path / "pf" / "spool" / "postoffice"
    lmtp_sock = socket_path(folder, "lmtp.sock")
    policy_sock = socket_path(folder, "policy.sock")
    transports = {domain: f"lmtp:unix:{lmtp_sock}" for domain in POSTOFFICE_DOMAINS}
    pf = PostfixInstance(tmp_path / "pf", transports, extra_main_cf=main_cf)
    assert folder.parent == pf.spool_dir
    folder.mkdir()
    os.chown(folder, os.geteuid(), grp.getgrnam("postfix").gr_gid)
    folder.chmod(0o2750)
    assert pf.check() == ""  # the example, as written, gives no warning either

    depot = uri_for(tmp_path / "var")
    config_path = write_config(
        tmp_path,
        zodb_uri=depot,
        lmtp={"listen": f"unix:{lmtp_sock}", "socket_mode": "0660"},
        queues=QUEUES,
        extra=f"\n[policy]\nlisten = unix:{policy_sock}\n",
    )
    server = start_serve(servers, config_path)
    policy = Process(
        tmp_path, config_path, module="postoffice.cli", args=("policy",), name="policy"
    )
    try:
        policy.wait_for("policy service listening on", stream="out", timeout=WAIT)
        # smtpd runs as the user postfix: it connects through the group alone.
        assert oct(policy_sock.stat().st_mode & 0o777) == oct(0o660)
        assert policy_sock.stat().st_gid == grp.getgrnam("postfix").gr_gid

        with pf:
            message = make_message("alice@app.test, nobody@unknown.test", "p1")
            refused = pf.send(SENDER, ["alice@app.test", "nobody@unknown.test"], message)

            # The client itself is told, in its session, for that recipient only.
            assert list(refused) == ["nobody@unknown.test"]
            code, text = refused["nobody@unknown.test"]
            assert 500 <= code < 600
            assert re.match(rb"5\.1\.1 .*<nobody@unknown\.test>: no queue for this recipient", text)

            assert "queued in App" in delivery_status(pf, "alice@app.test", "sent")
            pf.wait_until_queue_empty(WAIT)
            log = pf.maillog()
            assert re.search(r": reject: RCPT from .*: 5\d\d 5\.1\.1 <nobody@unknown\.test>", log)
            # Postfix never took the unknown recipient, so it bounced nothing to anyone.
            assert "sender non-delivery notification" not in log
            assert "status=bounced" not in log
            # Nor did it try to deliver to it.
            assert not re.search(r"to=<nobody@unknown\.test>.*status=", log)
    finally:
        assert policy.stop() == os.EX_OK
    server.stop()

    policy_log = policy.err.read_text()
    assert "to=<nobody@unknown.test>: REJECT 5.1.1" in policy_log
    (raw,) = stored(depot, "App")
    assert parse(raw)["X-Original-To"] == "alice@app.test"
    assert parse(raw)["Message-Id"] == "<p1@sender.test>"
    assert stored(depot, "Other") == []
