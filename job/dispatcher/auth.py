"""The push's OIDC token, checked by the dispatcher itself (PUSH_AUDIENCE).

Why, beside Cloud Run's IAM check: defence in depth on Cloud Run, and the only check where the
dispatcher runs anywhere else (Compose, GKE), since every request it accepts starts GPU work.
Pub/Sub push and Cloud Scheduler both send `Authorization: Bearer <ID token>`, signed by Google
for the subscription's (or the job's) service account. google-auth verifies the signature
against Google's published certificates and checks expiry and audience; the issuer and the
caller's service account are checked here. The certificates are fetched through a cache that
honours their Cache-Control (CacheControl), so a push does not cost a round trip to Google.

A refusal says why in our own words: google-auth's text names the audience it expected, which
a stranger probing the port must not learn (the log keeps google-auth's text).
"""

import cachecontrol
import requests
from google.auth import exceptions
from google.auth.transport.requests import Request
from google.oauth2 import id_token

from job.auth import Refused, Unavailable, bearer_token

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
CLOCK_SKEW_S = 10  # between Google's clock and ours; Pub/Sub's tokens live an hour
# google-auth's words -> what a refused caller is told
REASONS = (
    ("audience", "its audience is not this dispatcher's (PUSH_AUDIENCE)"),
    ("expired", "it has expired"),
    ("too early", "it is not valid yet (too early)"),
    ("signature", "its signature does not verify against Google's certificates"),
    ("key id", "its signing key is not among Google's certificates (key id not found)"),
)


class PushTokens:
    """Verify a request's Google-signed ID token for `audience` (and, when any are given, that
    it was minted for one of `service_accounts`). `certs_url` is Google's; tests serve their
    own keys."""

    def __init__(
        self, audience: str, service_accounts: tuple = (), certs_url: str = GOOGLE_CERTS_URL
    ):
        self.audience, self.service_accounts = audience, tuple(service_accounts)
        self.certs_url = certs_url
        self._request = Request(session=cachecontrol.CacheControl(requests.Session()))

    def __call__(self, headers) -> dict:
        token = bearer_token(headers)
        try:
            claims = id_token.verify_token(
                token,
                self._request,
                audience=self.audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=CLOCK_SKEW_S,
            )
        except exceptions.TransportError as exc:
            raise Unavailable(f"Google's signing certificates are out of reach: {exc}") from None
        except (ValueError, exceptions.GoogleAuthError) as exc:
            reason = next((why for words, why in REASONS if words in str(exc)), None)
            raise Refused(
                f"the push token is not valid: {reason or 'not a Google ID token'}", detail=exc
            ) from None
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise Refused(f"the push token was issued by {claims.get('iss')!r}, not Google")
        if self.service_accounts and not (
            claims.get("email") in self.service_accounts and claims.get("email_verified") is True
        ):
            raise Refused(
                f"the push token is for {claims.get('email')!r}, not PUSH_SERVICE_ACCOUNT"
            )
        return claims
