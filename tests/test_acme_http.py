"""The plain-HTTP listener's app, driven through httpx's ASGI transport."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from syncproxy.acme_http import ChallengeApp


@pytest.fixture
def app(tmp_path):
    challenges = tmp_path / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / "tok_EN-1").write_text("tok_EN-1.thumbprint")
    (tmp_path / "secret.txt").write_text("outside the challenge folder")
    return ChallengeApp(webroot=tmp_path, https_port=8443)


def request(app, method, url, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 5000))
        async with httpx.AsyncClient(transport=transport, follow_redirects=False) as client:
            return await client.request(method, url, **kwargs)
    return asyncio.run(go())


def test_challenge_token_served(app):
    response = request(app, "GET", "http://sync.example.org/.well-known/acme-challenge/tok_EN-1")
    assert response.status_code == 200
    assert response.text == "tok_EN-1.thumbprint"
    assert app.requests.total == 1
    assert app.requests.served == 1


def test_unknown_token_404_and_counted(app):
    response = request(app, "GET", "http://sync.example.org/.well-known/acme-challenge/missing")
    assert response.status_code == 404
    assert app.requests.total == 1
    assert app.requests.served == 0


@pytest.mark.parametrize("token", ["..%2Fsecret.txt", "../../secret.txt", "a.b", ""])
def test_path_outside_tokens_not_served(app, token):
    response = request(app, "GET", f"http://sync.example.org/.well-known/acme-challenge/{token}")
    assert "outside the challenge folder" not in response.text
    assert response.status_code in (301, 404)


def test_other_paths_redirect_to_https(app):
    response = request(app, "GET", "http://sync.example.org/sync/meta?x=1")
    assert response.status_code == 301
    assert response.headers["location"] == "https://sync.example.org:8443/sync/meta?x=1"


def test_post_redirect_keeps_method(app):
    response = request(app, "POST", "http://sync.example.org:80/sync/upload", content=b"data")
    assert response.status_code == 308
    assert response.headers["location"] == "https://sync.example.org:8443/sync/upload"


def test_default_https_port_omitted(tmp_path):
    app = ChallengeApp(webroot=tmp_path, https_port=443)
    response = request(app, "GET", "http://[::1]:80/")
    assert response.headers["location"] == "https://[::1]/"


def test_bad_host_header_rejected(app):
    response = request(app, "GET", "http://sync.example.org/", headers={"host": "evil.example\r\nx: y"})
    assert response.status_code == 400
