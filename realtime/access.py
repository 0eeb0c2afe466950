"""Who may open a session, how often, and from which web origins: the checks in front of ``POST /offer``.

One :class:`OfferGate` serves the single server and the ``--workers`` supervisor alike (the supervisor
sees the client's address; its workers see only the supervisor's):

* **Rate limit per client address** (``--offer-rate``/``--offer-burst``): a token bucket per address;
  over it, ``429`` with ``Retry-After``.
* **Bearer tokens** (``--token-secret`` or ``$EDTALK_LIVE_TOKEN_SECRET``): ``POST /offer`` needs
  ``Authorization: Bearer <JWT>``, HS256 only, with ``exp`` and ``aud`` (:data:`TOKEN_AUDIENCE`)
  required; otherwise ``401`` with ``WWW-Authenticate: Bearer``. :func:`make_token` mints one
  (``edtalk-live token``).
* **Bind check** (:func:`check_bind`): a server listening beyond loopback needs a token secret, or
  an explicit ``--insecure``.
* **CORS** (:func:`cors_middleware`): only the origins given (``--cors-origin``) get CORS headers
  (the WHIP/WHEP methods and headers included: ``PATCH``, ``DELETE``, ``If-Match``; ``Location``, ``ETag`` and
  ``Link`` exposed); with none, the page's own origin is the only one a browser lets call the API.
* **TURN credentials** (:func:`turn_credentials`): with ``--turn-secret`` (the ``static-auth-secret`` of a
  coturn-style TURN server) each caller gets its own short-lived username and password (the "TURN REST
  API" scheme), and only a caller holding a valid token gets them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Iterable

import jwt
from aiohttp import web

from edtalk_live.edtalk.errors import InputError
from edtalk_live.realtime.limits import TokenBuckets

#: the ``aud`` claim a token must carry
TOKEN_AUDIENCE = "edtalk-live"
#: the only signature algorithm accepted (fixed: a token never chooses how it is checked)
TOKEN_ALGORITHM = "HS256"
#: the environment variable read when ``--token-secret`` is not given
TOKEN_SECRET_ENV = "EDTALK_LIVE_TOKEN_SECRET"
#: the environment variable read when ``--turn-secret`` is not given
TURN_SECRET_ENV = "EDTALK_LIVE_TURN_SECRET"
#: the shortest secret accepted (RFC 7518 section 3.2: an HS256 key of at least 256 bits)
MIN_SECRET_BYTES = 32


def check_secret(secret: str | None) -> str | None:
    """``secret`` (``None``/empty: none), or :class:`InputError` when it is too short for HS256."""
    if not secret:
        return None
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise InputError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes long "
                         f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return secret


def secret_from_args(args) -> str | None:
    """The token secret of ``serve``'s arguments: ``--token-secret``, else ``$EDTALK_LIVE_TOKEN_SECRET``."""
    return check_secret(getattr(args, "token_secret", None) or os.environ.get(TOKEN_SECRET_ENV))


def make_token(secret: str, ttl_s: float = 3600.0, subject: str | None = None, now: float | None = None) -> str:
    """A token :meth:`OfferGate.check` accepts for ``ttl_s`` seconds."""
    now = time.time() if now is None else now
    claims = {"aud": TOKEN_AUDIENCE, "iat": int(now), "exp": int(now + ttl_s)}
    if subject:
        claims["sub"] = subject
    return jwt.encode(claims, secret, algorithm=TOKEN_ALGORITHM)


def turn_credentials(secret: str, ttl_s: float, user: str = TOKEN_AUDIENCE, now: float | None = None
                     ) -> dict[str, str]:
    """Time-limited TURN credentials (the TURN REST API scheme, coturn's ``use-auth-secret``): the username is
    ``<expiry unix time>:<user>`` and the password ``base64(HMAC-SHA1(secret, username))``; the TURN server,
    given the same secret, accepts them until the expiry. HMAC-SHA1 is what that scheme fixes (it is an HMAC,
    where SHA-1's collisions do not matter). Nothing is stored: any number of callers, no state."""
    now = time.time() if now is None else now
    username = f"{int(now + ttl_s)}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return {"username": username, "credential": base64.b64encode(digest).decode("ascii")}


def rtc_ice_servers(entries) -> list:
    """ICE server entries as ``/config`` lists them (``{"urls", "username"?, "credential"?}``) -> aiortc's
    ``RTCIceServer`` objects (the server's peer connections and the Python client use the same)."""
    from aiortc import RTCIceServer

    return [RTCIceServer(urls=e["urls"], username=e.get("username"), credential=e.get("credential")) for e in entries]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, secret: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a token secret, unless ``insecure`` says so on purpose."""
    if not is_loopback(host) and secret is None and not insecure:
        raise InputError(f"--host {host} makes the server reachable from other machines: give it a "
                         f"--token-secret (or ${TOKEN_SECRET_ENV}) so that only token holders open sessions, "
                         "or --insecure to serve anyone who can reach it")


class OfferGate:
    """The rate limit and the token check of ``POST /offer``; :meth:`check` answers a refusal, or ``None``."""

    def __init__(self, secret: str | None = None, rate: float | None = None, burst: int = 5,
                 on_reject: Callable[[str], None] | None = None):
        self.secret = check_secret(secret)
        self.buckets = TokenBuckets(rate, burst) if rate else None
        self.on_reject = on_reject or (lambda _reason: None)

    def check(self, request: web.Request, rate_limited: bool = True) -> web.Response | None:
        """A refusal of ``request`` (429 over the rate, 401 without a valid token), or None; ``rate_limited``
        False checks only the token (a WHIP/WHEP resource's PATCH and DELETE, which do not open a session)."""
        if self.buckets is not None and rate_limited:
            wait = self.buckets.take(request.remote)
            if wait > 0:
                self.on_reject("rate_limited")
                return web.json_response({"error": "too many offers from this address, try again later"},
                                         status=429, headers={"Retry-After": TokenBuckets.retry_after(wait)})
        if self.secret is not None:
            why = self.token_error(request.headers.get("Authorization"))
            if why is not None:
                self.on_reject("unauthorized")
                return web.json_response({"error": why}, status=401,
                                         headers={"WWW-Authenticate": f'Bearer realm="{TOKEN_AUDIENCE}"'})
        return None

    def authenticated(self, request: web.Request) -> bool:
        """Whether ``request`` carries a valid token (always False on a server without a token secret)."""
        return self.secret is not None and self.token_error(request.headers.get("Authorization")) is None

    def token_error(self, header: str | None) -> str | None:
        """Why ``header`` (an ``Authorization`` value) does not hold a valid token, or ``None`` when it does."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "this server needs a token: Authorization: Bearer <token>"
        try:
            jwt.decode(token.strip(), self.secret, algorithms=[TOKEN_ALGORITHM], audience=TOKEN_AUDIENCE,
                       options={"require": ["exp", "aud"]})
        except jwt.ExpiredSignatureError:
            return "the token has expired"
        except jwt.InvalidTokenError:
            return "the token is not valid for this server"
        return None


#: what an allowed origin's pages may send (WHIP/WHEP: PATCH with If-Match for trickle ICE, DELETE to hang up)
CORS_METHODS = "GET, HEAD, POST, PATCH, DELETE, OPTIONS"
CORS_REQUEST_HEADERS = "Authorization, Content-Type, If-Match"
#: response headers an allowed origin's pages may read (WHIP/WHEP: the resource, its entity-tag, the ICE servers)
CORS_EXPOSED_HEADERS = "Location, ETag, Link, Accept-Patch, Accept-Post, Retry-After"


def cors_middleware(origins: Iterable[str]) -> Callable:
    """An aiohttp middleware giving the listed origins CORS access (preflight included), nobody else.

    Written here rather than with ``aiohttp-cors`` (routes registered one by one, which the
    supervisor's catch-all proxy route and the static files make awkward): an allow-list is a few lines.
    """
    allowed = frozenset(o.rstrip("/") for o in origins)

    @web.middleware
    async def cors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        ok = origin is not None and origin in allowed
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not ok:
                return web.json_response({"error": "origin not allowed"}, status=403)
            response: web.StreamResponse = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
                "Access-Control-Max-Age": "600"})
        else:
            response = await handler(request)
            if ok:
                response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
        if ok:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return cors
