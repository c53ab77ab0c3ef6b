"""UI sessions are bound to the API key they were signed in with, over the real app (uvicorn on
127.0.0.1, PostgreSQL): a revoked key's or a signed-out session's saved cookie is refused at
once, a session ends after its absolute lifetime however busy it is, the sign-in form refuses
a post without its CSRF token, and the pages carry their security headers."""

from __future__ import annotations

import pytest
import requests
from sqlalchemy import update

from notifier import tenants
from notifier.db import Database
from tests.conftest import Stack
from tests.security.conftest import Web

pytestmark = [pytest.mark.integration]


def _page(web: Web, cookie: str) -> requests.Response:
    """/ui/notifications with nothing but a saved cookie, as a replaying attacker sends it."""
    return requests.get(f"{web.base}/ui/notifications", headers={"Cookie": f"notifier_ui={cookie}"},
                        allow_redirects=False, timeout=10)


def _refused(answer: requests.Response) -> bool:
    return answer.status_code == 303 and answer.headers["location"] == "/ui/login"


@pytest.mark.postgres
def test_a_revoked_keys_session_is_refused_at_once(web: Web, stack: Stack) -> None:
    browser = web.sign_in()
    saved = browser.cookies["notifier_ui"]
    assert _page(web, saved).status_code == 200
    database = Database(stack.settings.database_url)
    try:
        tenants.revoke_key(database, web.org, web.key[:10], now_ms=1)
    finally:
        database.dispose()
    assert _refused(_page(web, saved))
    assert _refused(browser.get(f"{web.base}/ui/notifications", allow_redirects=False, timeout=10))


@pytest.mark.postgres
def test_a_signed_out_sessions_saved_cookie_is_refused(web: Web) -> None:
    browser = web.sign_in()
    saved = browser.cookies["notifier_ui"]
    assert _page(web, saved).status_code == 200
    out = browser.post(f"{web.base}/ui/logout", allow_redirects=False, timeout=10)
    assert out.status_code == 303
    assert _refused(_page(web, saved))


@pytest.mark.postgres
def test_a_second_key_of_the_org_keeps_its_own_session(web: Web, stack: Stack) -> None:
    database = Database(stack.settings.database_url)
    try:
        second = tenants.create_key(database, web.org, now_ms=1)
        kept = web.sign_in(second).cookies["notifier_ui"]
        ended = web.sign_in().cookies["notifier_ui"]
        tenants.revoke_key(database, web.org, web.key[:10], now_ms=1)
    finally:
        database.dispose()
    assert _refused(_page(web, ended))
    assert _page(web, kept).status_code == 200


@pytest.mark.postgres
def test_a_session_ends_after_its_absolute_lifetime_however_busy(web: Web, stack: Stack) -> None:
    from notifier.models import UiSession

    saved = web.sign_in().cookies["notifier_ui"]
    assert _page(web, saved).status_code == 200
    database = Database(stack.settings.database_url)
    try:
        # Signed in longer ago than the absolute lifetime, yet seen a moment ago.
        with database.session() as session:
            session.execute(update(UiSession).values(
                created_at_ms=UiSession.created_at_ms
                - int(stack.settings.ui_session_max_seconds * 1000) - 1))
    finally:
        database.dispose()
    assert _refused(_page(web, saved))


@pytest.mark.postgres
def test_a_session_idle_past_its_idle_lifetime_ends(web: Web, stack: Stack) -> None:
    from notifier.models import UiSession

    saved = web.sign_in().cookies["notifier_ui"]
    database = Database(stack.settings.database_url)
    try:
        with database.session() as session:
            session.execute(update(UiSession).values(
                last_seen_at_ms=UiSession.last_seen_at_ms
                - int(stack.settings.ui_session_idle_seconds * 1000) - 1))
    finally:
        database.dispose()
    assert _refused(_page(web, saved))


@pytest.mark.postgres
def test_the_sign_in_form_refuses_a_post_without_its_csrf_token(web: Web) -> None:
    credentials = {"orgId": str(web.org), "apiKey": web.key}
    # Another site's form: no cookie of ours, no token.
    victim = requests.Session()
    forged = victim.post(f"{web.base}/ui/login", data=credentials, allow_redirects=False,
                         timeout=10)
    assert forged.status_code == 403, forged.status_code
    assert not _signed_in(victim, web)
    # Our cookie from the form, and a token that is not its own.
    browser = requests.Session()
    browser.get(f"{web.base}/ui/login", timeout=10)
    wrong = browser.post(f"{web.base}/ui/login", data={**credentials, "csrf": "x" * 43},
                         allow_redirects=False, timeout=10)
    assert wrong.status_code == 403
    assert not _signed_in(browser, web)
    # The real form, token and all, signs in.
    assert _signed_in(web.sign_in(), web)


def _signed_in(browser: requests.Session, web: Web) -> bool:
    return browser.get(f"{web.base}/ui/notifications", allow_redirects=False,
                       timeout=10).status_code == 200


@pytest.mark.postgres
def test_ui_pages_refuse_framing_and_the_cookie_is_secure_over_https(web: Web) -> None:
    page = requests.get(f"{web.base}/ui/login", timeout=10)
    assert "frame-ancestors 'none'" in page.headers.get("content-security-policy", "")
    plain = page.headers["set-cookie"]
    assert "notifier_ui=" in plain and "secure" not in plain.lower()  # http on 127.0.0.1 works
    # Behind a TLS proxy on this host (uvicorn trusts 127.0.0.1's X-Forwarded-Proto).
    tls = requests.get(f"{web.base}/ui/login", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    assert "secure" in [part.strip().lower() for part in tls.headers["set-cookie"].split(";")]


def test_sessions_on_both_databases(db: Database) -> None:
    """The same rules on SQLite (the embedded default) as on PostgreSQL."""
    from notifier import store
    from notifier.errors import AuthenticationFailed
    from notifier.ui import sessions

    store.create_org(db, 5, "org", now_ms=0)
    key = tenants.create_key(db, 5, now_ms=0)
    org_id, key_id = tenants.authenticate_key(db, key, org_id=5)
    rules = {"idle_ms": 1000, "max_ms": 5000}
    one = sessions.start(db, org_id, key_id, now_ms=0, max_ms=5000)
    two = sessions.start(db, org_id, key_id, now_ms=0, max_ms=5000)
    # Used every 900 ms, it outlives its idle time, but not its absolute one.
    for now in range(900, 5000, 900):
        assert sessions.check(db, one, now_ms=now, **rules) == 5
    with pytest.raises(AuthenticationFailed, match="absolute"):
        sessions.check(db, one, now_ms=5000, **rules)
    with pytest.raises(AuthenticationFailed, match="idle"):
        sessions.check(db, two, now_ms=1000, **rules)
    three = sessions.start(db, org_id, key_id, now_ms=10_000, max_ms=5000)
    sessions.end(db, three, now_ms=10_001)
    with pytest.raises(AuthenticationFailed, match="signed out"):
        sessions.check(db, three, now_ms=10_002, **rules)
    four = sessions.start(db, org_id, key_id, now_ms=20_000, max_ms=5000)
    tenants.revoke_key(db, 5, key[:10], now_ms=20_001)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        sessions.check(db, four, now_ms=20_002, **rules)
    with pytest.raises(AuthenticationFailed):
        sessions.check(db, "not-a-session", now_ms=20_002, **rules)
