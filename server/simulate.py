"""`python run.py simulate`: signed, realistic WhatsApp Cloud API webhooks for a local server.

For demos, manual tests and load: several customers with Arabic and English names write
text, photos, voice notes, locations, button replies and reactions, and WhatsApp reports
statuses, at a chosen rate, until a count or a duration is reached. It only talks to the
URL it is given, and refuses anything but loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import string
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from server.integrations.whatsapp_webhook import sign

DEMO_APP_SECRET: Final = "demo-app-secret"
WEBHOOK_PATH: Final = "/webhooks/whatsapp"
PHONE_NUMBER_ID: Final = "106540352242922"
DISPLAY_NUMBER: Final = "15550783881"
BUSINESS_ACCOUNT_ID: Final = "102290129340398"
# Requests in flight at once; enough to hold the rate when the server takes a while.
MAX_IN_FLIGHT: Final = 64

CUSTOMERS: Final = (
    ("966501234567", "سارة العتيبي", "ar"),
    ("447700900123", "Emily Clarke", "en"),
    ("201001234567", "محمد علي", "ar"),
    ("14155550123", "James Miller", "en"),
    ("971501234567", "فاطمة الزهراء", "ar"),
    ("966551112233", "Omar Haddad", "en"),
    ("962791234567", "ليلى حداد", "ar"),
    ("61412345678", "Olivia Brown", "en"),
)
TEXTS: Final = {
    "en": (
        "Hi, what are your opening hours?",
        "Where is my order? It has been three days.",
        "Can I return a jacket I bought last week?",
        "Do you accept Apple Pay?",
        "Thanks, that helps a lot!",
        "Is the blue one still in stock in size M?",
        "I'd like to talk to a person please",
    ),
    "ar": (
        "السلام عليكم، متى تفتحون؟",
        "وين طلبي؟ صار له ثلاثة أيام",
        "هل أقدر أرجع المنتج؟",
        "هل الدفع عند الاستلام متاح؟",
        "شكرًا جزيلًا",
        "أبغى أكلم موظف لو سمحت",
        "هل عندكم توصيل للدمام؟",
    ),
}
# How often each kind of update appears; text dominates as it does in real traffic.
KINDS: Final = (
    ("text", 60),
    ("image", 8),
    ("audio", 6),
    ("location", 4),
    ("interactive", 6),
    ("reaction", 4),
    ("document", 3),
    ("sticker", 3),
    ("unsupported", 2),
    ("status", 4),
)


@dataclass(slots=True)
class Summary:
    """What a simulation sent and what the server answered."""

    requests: int = 0
    messages: int = 0
    statuses: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every request was answered 200."""
        return self.requests > 0 and self.answers.get("200", 0) == self.requests


class Traffic:
    """Builds realistic webhook bodies, reproducibly from a seed."""

    def __init__(self, seed: int | None, customers: int) -> None:
        self.rng = random.Random(seed)
        self.customers = CUSTOMERS[: max(1, min(customers, len(CUSTOMERS)))]
        # Recent customer messages, for reactions to point at.
        self.sent_wamids: deque[str] = deque(maxlen=100)
        self._kinds = [k for k, _ in KINDS]
        self._weights = [w for _, w in KINDS]

    def wamid(self) -> str:
        """A message id shaped like WhatsApp's."""
        alphabet = string.ascii_letters + string.digits
        return "wamid.HBgM" + "".join(self.rng.choice(alphabet) for _ in range(40))

    def body(self, updates: int) -> tuple[dict[str, Any], int, int]:
        """One webhook body with `updates` messages or statuses: (body, messages, statuses)."""
        messages: list[tuple[tuple[str, str, str], dict[str, Any]]] = []
        statuses: list[dict[str, Any]] = []
        for _ in range(updates):
            kind = self.rng.choices(self._kinds, self._weights)[0]
            customer = self.rng.choice(self.customers)
            if kind == "status":
                statuses.append(self.status(customer[0]))
            else:
                messages.append((customer, self.message(kind, customer)))
        changes = []
        if messages:
            contacts = {c[0]: c for c, _ in messages}
            changes.append(
                self._change(
                    {
                        "contacts": [
                            {"profile": {"name": name}, "wa_id": wa_id}
                            for wa_id, name, _ in contacts.values()
                        ],
                        "messages": [m for _, m in messages],
                    }
                )
            )
        if statuses:
            changes.append(self._change({"statuses": statuses}))
        body = {
            "object": "whatsapp_business_account",
            "entry": [{"id": BUSINESS_ACCOUNT_ID, "changes": changes}],
        }
        return body, len(messages), len(statuses)

    @staticmethod
    def _change(value: dict[str, Any]) -> dict[str, Any]:
        return {
            "field": "messages",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": {
                    "display_phone_number": DISPLAY_NUMBER,
                    "phone_number_id": PHONE_NUMBER_ID,
                },
                **value,
            },
        }

    def message(self, kind: str, customer: tuple[str, str, str]) -> dict[str, Any]:
        """One `messages[]` element of the given kind from a customer."""
        wa_id, _, lang = customer
        wamid = self.wamid()
        m: dict[str, Any] = {"from": wa_id, "id": wamid, "timestamp": str(int(time.time()))}
        media_id = str(self.rng.randrange(10**15, 10**16))
        if kind == "text":
            m |= {"type": "text", "text": {"body": self.rng.choice(TEXTS[lang])}}
        elif kind == "image":
            caption = "هذا المنتج" if lang == "ar" else "This one, please"
            m |= {
                "type": "image",
                "image": {"caption": caption, "mime_type": "image/jpeg", "id": media_id},
            }
        elif kind == "audio":
            m |= {
                "type": "audio",
                "audio": {"mime_type": "audio/ogg; codecs=opus", "id": media_id, "voice": True},
            }
        elif kind == "document":
            m |= {
                "type": "document",
                "document": {
                    "caption": "Invoice",
                    "filename": "invoice-1042.pdf",
                    "mime_type": "application/pdf",
                    "id": media_id,
                },
            }
        elif kind == "sticker":
            m |= {
                "type": "sticker",
                "sticker": {"mime_type": "image/webp", "id": media_id, "animated": False},
            }
        elif kind == "location":
            m |= {
                "type": "location",
                "location": {
                    "latitude": round(24.7136 + self.rng.uniform(-0.05, 0.05), 6),
                    "longitude": round(46.6753 + self.rng.uniform(-0.05, 0.05), 6),
                    "name": "Kingdom Centre",
                    "address": "King Fahd Rd, Riyadh",
                },
            }
        elif kind == "interactive":
            title = "نعم، أكد الطلب" if lang == "ar" else "Yes, confirm my order"
            m |= {
                "type": "interactive",
                "interactive": {
                    "type": "button_reply",
                    "button_reply": {"id": "confirm_order", "title": title},
                },
                "context": {"from": DISPLAY_NUMBER, "id": self.wamid()},
            }
        elif kind == "reaction":
            target = self.rng.choice(self.sent_wamids) if self.sent_wamids else self.wamid()
            m |= {"type": "reaction", "reaction": {"message_id": target, "emoji": "👍"}}
        else:
            m |= {
                "type": "unsupported",
                "errors": [
                    {
                        "code": 131051,
                        "title": "Message type unknown",
                        "message": "Message type unknown",
                        "error_data": {"details": "Message type is currently not supported."},
                    }
                ],
            }
        self.sent_wamids.append(wamid)
        return m

    def status(self, wa_id: str) -> dict[str, Any]:
        """A `statuses[]` element for an outbound message (unknown ones are ignored)."""
        status = self.rng.choice(("sent", "delivered", "read"))
        return {
            "id": self.wamid(),
            "status": status,
            "timestamp": str(int(time.time())),
            "recipient_id": wa_id,
        }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The simulator's command line."""
    parser = argparse.ArgumentParser(
        prog="run.py simulate",
        description="Send signed WhatsApp Cloud API webhooks to a running Live Chat server.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    parser.add_argument(
        "--secret",
        default=os.environ.get("WHATSAPP_APP_SECRET") or DEMO_APP_SECRET,
        help="app secret to sign with (WHATSAPP_APP_SECRET, else the demo's)",
    )
    parser.add_argument(
        "--rate", type=float, default=5.0, help="updates (messages and statuses) per second (5)"
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--count", type=int, help="stop after this many updates (default 20)")
    stop.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--batch", type=int, default=1, help="updates per webhook request (1)")
    parser.add_argument("--customers", type=int, default=6, help="distinct customers (max 8)")
    parser.add_argument("--seed", type=int, help="random seed, for a reproducible run")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a URL that is not loopback"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.batch < 1 or args.batch > 1000:
        parser.error("--batch must be 1..1000 (WhatsApp batches at most 1,000 updates)")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    if args.count is None and args.duration is None:
        args.count = 20
    return args


def is_loopback(url: str) -> bool:
    """True when the URL's host is this machine."""
    host = urlsplit(url).hostname
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


async def simulate(args: argparse.Namespace) -> Summary:
    """Send webhooks at the chosen rate until the count or duration is reached."""
    traffic = Traffic(args.seed, args.customers)
    summary = Summary()
    url = args.url.rstrip("/") + WEBHOOK_PATH
    interval = args.batch / args.rate
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
    started = time.perf_counter()
    deadline = started + args.duration if args.duration is not None else None
    tasks: set[asyncio.Task[None]] = set()

    async def post(session: aiohttp.ClientSession, raw: bytes) -> None:
        sent = time.perf_counter()
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sign(args.secret, raw),
        }
        try:
            # Never follow a redirect: the loopback check was made on the URL given, and a
            # redirect could send signed traffic anywhere.
            async with session.post(url, data=raw, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                summary.answers[str(resp.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as e:
            summary.answers[type(e).__name__] += 1
        finally:
            summary.latencies_ms.append((time.perf_counter() - sent) * 1000)
            in_flight.release()

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        n = 0
        while True:
            if args.count is not None and summary.messages + summary.statuses >= args.count:
                break
            due = started + n * interval
            if deadline is not None and due >= deadline:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            size = args.batch
            if args.count is not None:
                size = min(size, args.count - summary.messages - summary.statuses)
            body, messages, statuses = traffic.body(size)
            summary.messages += messages
            summary.statuses += statuses
            summary.requests += 1
            raw = json.dumps(body, ensure_ascii=False).encode()
            await in_flight.acquire()
            task = asyncio.create_task(post(session, raw))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)
    summary.duration_s = time.perf_counter() - started
    return summary


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def report(summary: Summary) -> str:
    """A short human summary of a run."""
    rate = (summary.messages + summary.statuses) / summary.duration_s if summary.duration_s else 0
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(summary.answers.items())) or "none"
    return (
        f"sent {summary.messages} messages and {summary.statuses} statuses"
        f" in {summary.requests} requests over {summary.duration_s:.2f} s ({rate:.1f}/s)\n"
        f"answers: {answers}\n"
        f"latency: p50 {_percentile(summary.latencies_ms, 0.5):.1f} ms,"
        f" p99 {_percentile(summary.latencies_ms, 0.99):.1f} ms"
    )
