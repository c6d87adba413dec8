"""What a push request carries: a Pub/Sub push body, the same body under Eventarc's binary-mode
ce-* headers, or a structured CloudEvent whose `data` is that body. All three come down to one
Envelope: the message bytes, its messageId (the dedupe key) and its attributes."""

import base64
import binascii
import json
from dataclasses import dataclass

PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"


class EnvelopeError(ValueError):
    """The request is not a Pub/Sub delivery in any form we know."""


@dataclass(frozen=True)
class Envelope:
    data: bytes  # the Pub/Sub message payload (base64-decoded)
    message_id: str | None
    attributes: dict
    transport: str  # pubsub-push | eventarc-binary | eventarc-structured
    delivery_attempt: int | None = None


def _unwrap(headers, document) -> tuple:
    """(push body, transport, CloudEvent id) from whichever of the three forms came."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    event_id = event_type = None
    if content_type == "application/cloudevents+json":
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise EnvelopeError("structured CloudEvent without a JSON object in `data`")
        event_id, event_type = document.get("id"), document.get("type")
        payload, transport = document["data"], "eventarc-structured"
    elif "ce-id" in headers or "ce-type" in headers:
        event_id, event_type = headers.get("ce-id"), headers.get("ce-type")
        payload, transport = document, "eventarc-binary"
    else:
        payload, transport = document, "pubsub-push"
    if event_type is not None and event_type != PUBSUB_EVENT_TYPE:
        raise EnvelopeError(f"CloudEvent type {str(event_type)[:100]!r} is not {PUBSUB_EVENT_TYPE}")
    return payload, transport, event_id


def parse_envelope(headers, body: bytes) -> Envelope:
    """The Envelope in a request, or EnvelopeError saying why there is none."""
    try:
        document = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EnvelopeError("the request body is not JSON") from None
    payload, transport, event_id = _unwrap(headers, document)
    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, dict):
        raise EnvelopeError("no Pub/Sub `message` object in the request")
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise EnvelopeError("message.data is not base64") from None
    # Eventarc's ce-id is the Pub/Sub messageId, so a redelivery keeps its key either way.
    message_id = message.get("messageId") or message.get("message_id") or event_id
    attempt = payload.get("deliveryAttempt")
    attributes = message.get("attributes")
    return Envelope(
        data,
        str(message_id) if message_id else None,
        attributes if isinstance(attributes, dict) else {},
        transport,
        attempt if isinstance(attempt, int) else None,
    )
