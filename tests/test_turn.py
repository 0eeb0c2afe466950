"""TURN credentials made per caller (TURN REST API) and handed only to token holders (issue 15)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from types import SimpleNamespace

import aiohttp
import jwt
import pytest
from conftest import Running

from edtalk_live.edtalk.errors import InputError
from edtalk_live.realtime.access import turn_credentials
from edtalk_live.realtime.server import ServerSettings

SECRET = "s3cret-for-the-tests-only-0123456789abcdef"
TURN_SECRET = "turn-shared-secret-of-the-tests"


def _valid(entry: dict, secret: str, now: float, ttl: float) -> bool:
    """What a TURN server with ``secret`` checks: the expiry in the username, the HMAC-SHA1 password."""
    expiry, _, _user = entry["username"].partition(":")
    want = hmac.new(secret.encode(), entry["username"].encode(), hashlib.sha1).digest()
    return (now < int(expiry) <= now + ttl + 1
            and hmac.compare_digest(base64.b64decode(entry["credential"]), want))


def test_credentials_expire_and_are_signed_with_the_secret():
    now = 1_800_000_000.0
    c = turn_credentials(TURN_SECRET, 600, now=now)
    assert c["username"] == "1800000600:edtalk-live"
    assert _valid(c, TURN_SECRET, now, 600)
    assert not _valid(c, TURN_SECRET + "x", now, 600)
    assert turn_credentials(TURN_SECRET, 600, now=now + 1)["credential"] != c["credential"]


def test_turn_secret_needs_a_token_secret_and_servers_need_a_secret():
    with pytest.raises(InputError, match="token"):
        ServerSettings(turn_servers=("turn:turn.example:3478",), turn_secret=TURN_SECRET)
    with pytest.raises(InputError, match="TURN secret"):
        ServerSettings(turn_servers=("turn:turn.example:3478",), token_secret=SECRET)
    with pytest.raises(InputError, match="turn_ttl"):
        ServerSettings(turn_servers=("turn:t.example",), turn_secret=TURN_SECRET, token_secret=SECRET, turn_ttl=0)


def _serve_args(**over) -> SimpleNamespace:
    args = dict(udp_ports=None, ice_server=["stun:stun.example:3478", "turn:turn.example:3478"], turn_username=None,
                turn_credential=None, turn_secret=None, turn_ttl=900.0, host="127.0.0.1", port=8080, max_sessions=4,
                inactivity_timeout=8.0, connect_timeout=15.0, render_budget=None, max_batch=16, render_threads=1,
                audio_prefetch=1, token_secret=SECRET, insecure=False, offer_rate=1.0, offer_burst=5,
                cors_origin=None)
    args.update(over)
    return SimpleNamespace(**args)


def test_serve_arguments(monkeypatch):
    from edtalk_live.realtime.serve import settings_from_args

    monkeypatch.delenv("EDTALK_LIVE_TURN_SECRET", raising=False)
    s = settings_from_args(_serve_args(turn_secret=TURN_SECRET))
    assert s.turn_servers == ("turn:turn.example:3478",) and s.turn_ttl == 900.0
    assert s.ice_servers == ({"urls": "stun:stun.example:3478"},)
    with pytest.raises(InputError, match="--turn-secret"):
        settings_from_args(_serve_args())
    monkeypatch.setenv("EDTALK_LIVE_TURN_SECRET", TURN_SECRET)
    assert settings_from_args(_serve_args()).turn_servers == ("turn:turn.example:3478",)


def test_config_hands_turn_credentials_only_to_token_holders(edtalk_weights, face_image):
    static = {"urls": "turn:fixed.example:3478", "username": "u", "credential": "long-term"}

    async def main():
        async with Running(edtalk_weights, face_image, token_secret=SECRET, turn_secret=TURN_SECRET,
                           turn_servers=("turn:turn.example:3478", "turns:turn.example:5349"), turn_ttl=300,
                           ice_servers=({"urls": "stun:stun.example:3478"}, static)) as srv:
            token = jwt.encode({"aud": "edtalk-live", "exp": time.time() + 60}, SECRET, algorithm="HS256")
            expired = jwt.encode({"aud": "edtalk-live", "exp": time.time() - 60}, SECRET, algorithm="HS256")
            out = {}
            async with aiohttp.ClientSession() as http:
                for name, headers in (("none", {}), ("expired", {"Authorization": f"Bearer {expired}"}),
                                      ("token", {"Authorization": f"Bearer {token}"})):
                    async with http.get(srv.url + "/config", headers=headers) as r:
                        out[name] = (r.status, (await r.json())["ice_servers"])
            return out, time.time()

    out, now = asyncio.run(main())
    for name in ("none", "expired"):
        status, servers = out[name]
        assert status == 200
        assert servers == [{"urls": "stun:stun.example:3478"}], f"{name}: {servers}"
    status, servers = out["token"]
    assert status == 200
    assert {"urls": "stun:stun.example:3478"} in servers and static in servers
    made = [e for e in servers if e["urls"].endswith("turn.example:3478") or e["urls"].endswith(":5349")]
    assert [e["urls"] for e in made] == ["turn:turn.example:3478", "turns:turn.example:5349"]
    assert all(_valid(e, TURN_SECRET, now - 5, 300 + 5) for e in made)
