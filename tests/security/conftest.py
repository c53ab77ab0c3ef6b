"""Fixtures of the security tests: the real API under uvicorn, with an org and its API key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import requests

from tests.conftest import Stack, sign_in_form

ORG = 71


@dataclass
class Web:
    """The API of a running stack, and the org (with its live key) the tests sign in as."""

    base: str
    org: int
    key: str

    def sign_in(self, key: str | None = None) -> requests.Session:
        """A browser's sign-in: the form is fetched (its CSRF token taken along) and posted;
        the session returned holds the UI's cookie."""
        browser = requests.Session()
        form = browser.get(f"{self.base}/ui/login", timeout=10)
        answer = browser.post(f"{self.base}/ui/login", timeout=10, allow_redirects=False,
                              data=sign_in_form(form.text, self.org, key or self.key))
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/ui/notifications"
        return browser


@pytest.fixture
def web(stack: Stack) -> Web:
    key = stack.org(ORG, "Session Test Org")
    return Web(stack.web(), ORG, key)
