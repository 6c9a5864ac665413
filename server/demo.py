"""Demo data: customers with Arabic and English names, and believable conversations.

Generated in batches, oldest activity first, and written batch by batch: a million
conversations never exist in memory at once, and the store holds its messages in the
order they happened (its search lists the newest first).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Final

from server.models import Conversation, LastMessage, Media, Message, now_ms
from server.passwords import hash_password
from server.store.agents import Agent, AgentStore
from server.store.base import ChatStore, message_id_for_wamid

# The demo team: (id, email, name, role). The admin is who `run.py --demo` signs in as;
# the agents answer and are assigned conversations in the demo data.
DEMO_ADMIN_EMAIL: Final = "admin@example.com"
DEMO_AGENTS: Final = (
    ("a_demo_admin", DEMO_ADMIN_EMAIL, "Demo Admin", "admin"),
    ("a_demo_reem", "reem@example.com", "Reem", "agent"),
    ("a_demo_nouf", "nouf@example.com", "Nouf", "agent"),
)
# Agents who answer and are assigned conversations in the demo data.
DEMO_ASSIGNEES: Final = ("a_demo_reem", "a_demo_nouf", "a_demo_admin")
# An Argon2 hash string no password matches: the demo agents of a server started without a
# demo password cannot sign in (tests make their own agents).
NO_PASSWORD: Final = "!"

# Customers write in the language of their name: Arabic script, or English.
NAMES_AR: Final = (
    ("سارة", "محمد", "فاطمة", "عبدالله", "نورة", "خالد", "ريم", "يوسف", "لمى", "سلطان"),
    ("العتيبي", "الشمري", "الدوسري", "الغامدي", "الزهراني", "القحطاني", "الحربي"),
)
NAMES_EN: Final = (
    (
        "Sara",
        "Omar",
        "Layla",
        "Yousef",
        "Noura",
        "Khalid",
        "Emily",
        "James",
        "Olivia",
        "Daniel",
        "Sophia",
        "Michael",
        "Amelia",
        "David",
        "Grace",
    ),
    (
        "Al-Harbi",
        "Al-Qahtani",
        "Haddad",
        "Mansour",
        "Nasser",
        "Smith",
        "Johnson",
        "Brown",
        "Taylor",
        "Wilson",
        "Rahman",
        "Saleh",
    ),
)
CUSTOMER_EN: Final = (
    "Hi, where is my order? It was supposed to arrive yesterday.",
    "Do you deliver to Jeddah on weekends?",
    "I want to return the shoes I bought, they are too small.",
    "What are your opening hours today?",
    "Can I change the delivery address for order {order}?",
    "Please send me the invoice for order {order}.",
    "Is the blue one back in stock?",
    "Thanks, that solved it!",
    "The payment went through twice, can you check?",
)
CUSTOMER_AR: Final = (
    "مرحبا، متى يوصل طلبي؟",
    "هل يوجد توصيل مجاني للرياض؟",
    "أبغى أغير المقاس لو سمحت",
    "كم سعر الشحن إلى الدمام؟",
    "شكراً لكم، الخدمة ممتازة",
    "الدفع عند الاستلام متاح؟",
    "عندي مشكلة في الفاتورة",
    "أرسلوا لي فاتورة الطلب رقم {order} لو سمحتم",
    "شُكْرًا جَزِيلًا عَلَى المُسَاعَدَةِ",
)
AI_EN: Final = (
    "Thanks for reaching out! Your order is on its way and should arrive within 2 days.",
    "We deliver every day, weekends included, between 9 am and 10 pm.",
    "Returns are free within 14 days. I have started a return for you.",
)
AI_AR: Final = (
    "أهلاً بك! طلبك في الطريق وسيصل خلال يومين.",
    "نعم، التوصيل مجاني للطلبات فوق 200 ريال.",
    "يسعدنا خدمتك، تم تحويل طلبك إلى أحد موظفينا.",
)
AGENT_EN: Final = (
    "Hi, this is Reem from the support team. I have refunded the duplicate payment.",
    "I checked with the warehouse: your parcel leaves today.",
)
AGENT_AR: Final = (
    "مرحباً، معك نوف من خدمة العملاء. تم تعديل العنوان.",
    "تم استرجاع المبلغ، يظهر في حسابك خلال ٣ أيام عمل.",
)
LINES: Final = {
    "ar": {"user": CUSTOMER_AR, "ai": AI_AR, "agent": AGENT_AR},
    "en": {"user": CUSTOMER_EN, "ai": AI_EN, "agent": AGENT_EN},
}
MEDIA_TYPES: Final = (
    ("image", "image/jpeg"),
    ("audio", "audio/ogg"),
    ("document", "application/pdf"),
)
# Activity spreads over two weeks, like a real inbox on a Monday morning.
SPREAD_MS: Final = 14 * 24 * 3600 * 1000


# Conversations per batch of the streamed demo (about 5 MB of records while they live).
DEMO_BATCH: Final = 2_000


def build_demo(count: int, seed: int = 7) -> tuple[list[Conversation], list[Message]]:
    """`count` conversations (one customer each) with 2 to 8 messages apiece, at once."""
    conversations: list[Conversation] = []
    messages: list[Message] = []
    for batch_conversations, batch_messages in demo_batches(count, seed=seed, batch=count):
        conversations += batch_conversations
        messages += batch_messages
    return conversations, messages


def demo_batches(
    count: int, *, seed: int = 7, batch: int = DEMO_BATCH, now: int | None = None
) -> Iterator[tuple[list[Conversation], list[Message]]]:
    """`count` demo conversations in batches of `batch`, oldest latest activity first.

    Conversation n's latest message falls at n/count of the way through the past two
    weeks (with a jitter); its thread leads up to it.
    """
    rng = random.Random(seed)
    rand = rng.random
    now = now_ms() if now is None else now

    def pick(options: Sequence[str]) -> str:
        return options[int(rand() * len(options))]

    for first in range(0, count, max(1, batch)):
        conversations: list[Conversation] = []
        messages: list[Message] = []
        for n in range(first, min(count, first + batch)):
            conversation, thread = _conversation(n, count, now, rand, pick)
            conversations.append(conversation)
            messages += thread
        yield conversations, messages


def _conversation(
    n: int,
    count: int,
    now: int,
    rand: Callable[[], float],
    pick: Callable[[Sequence[str]], str],
) -> tuple[Conversation, list[Message]]:
    phone = f"9665{10_000_000 + int(rand() * 89_999_999)}{n % 10}"
    lang = "ar" if rand() < 0.45 else "en"
    first, last_names = NAMES_AR if lang == "ar" else NAMES_EN
    name = f"{pick(first)} {pick(last_names)}"
    conversation_id = f"c_demo{n:07d}"
    # An order number of the customer's own, for the lines that mention one.
    order = str(10_000 + (n * 7_919) % 90_000)
    gaps = [20_000 + int(rand() * 880_000) for _ in range(2 + int(rand() * 7))]
    last_at = now - 60_000 - int((SPREAD_MS - 60_000) * (1 - (n + rand()) / max(count, 1)))
    start = last_at - sum(gaps)
    at = start
    lines = LINES[lang]
    thread: list[Message] = []
    for i, gap in enumerate(gaps):
        at += gap
        if i == 0 or rand() < 0.45:
            kind = "user"
        else:
            kind = "ai" if rand() < 0.7 else "agent"
        thread.append(_message(rand, pick, lines, conversation_id, kind, at, n, i, order))
    # Who answered and who is assigned come from a generator of the conversation's own, so
    # the rest of the demo is what it was before it had a team, whatever the batches.
    team = random.Random(f"team-{n}")
    thread = [
        replace(m, agent_id=team.choice(DEMO_ASSIGNEES[:2])) if m.sender == "agent" else m
        for m in thread
    ]
    last = thread[-1]
    unread = 0
    for m in reversed(thread):
        if m.direction != "in":
            break
        unread += 1
    status = "resolved" if rand() < 0.3 else "open"
    # Most conversations an agent answered are theirs; some others wait, unassigned.
    answered = [m.agent_id for m in thread if m.agent_id]
    assignee = answered[-1] if answered else None
    if assignee is None and team.random() < 0.35:
        assignee = team.choice(DEMO_ASSIGNEES)
    last_in = max((m.at for m in thread if m.direction == "in"), default=None)
    conversation = Conversation(
        id=conversation_id,
        user_id=phone,
        user_name=name,
        phone="+" + phone,
        channel="whatsapp",
        status=status,
        unread_count=0 if status == "resolved" else unread,
        ai_enabled=not any(m.sender == "agent" for m in thread),
        assignee=assignee,
        created_at=start,
        last_activity=last.at,
        last_message=LastMessage.of(last),
        updated_at=last.at,
        last_inbound_at=last_in,
    )
    return conversation, thread


def _message(
    rand: Callable[[], float],
    pick: Callable[[Sequence[str]], str],
    lines: dict[str, tuple[str, ...]],
    conversation_id: str,
    kind: str,
    at: int,
    n: int,
    i: int,
    order: str,
) -> Message:
    if kind == "user":
        wamid = f"wamid.demo{n:07d}{i:02d}"
        if rand() < 0.08:
            mtype, mime = MEDIA_TYPES[int(rand() * len(MEDIA_TYPES))]
            return Message(
                id=message_id_for_wamid(wamid),
                conversation_id=conversation_id,
                direction="in",
                sender="user",
                type=mtype,
                text=None,
                at=at,
                status="received",
                media=Media(id=f"media{n}{i}", mime_type=mime, caption=None),
                wa_message_id=wamid,
            )
        return Message(
            id=message_id_for_wamid(wamid),
            conversation_id=conversation_id,
            direction="in",
            sender="user",
            type="text",
            text=pick(lines["user"]).replace("{order}", order),
            at=at,
            status="received",
            wa_message_id=wamid,
        )
    return Message(
        id=f"m_demo{n:07d}{i:02d}",
        conversation_id=conversation_id,
        direction="out",
        sender=kind,  # type: ignore[arg-type]
        type="text",
        text=pick(lines[kind]),
        at=at,
        status=pick(("delivered", "read", "read")),
        agent_id=None,  # the conversation names who answered
        wa_message_id=f"wamid.demo-out{n:07d}{i:02d}",
    )


async def seed_demo(store: ChatStore, count: int, batch: int = DEMO_BATCH) -> int:
    """Load `count` demo conversations into an empty store; returns how many it added.

    Streamed: the next batch is generated while the store writes the one before, so
    memory holds two batches at most, whatever the count.
    """
    if await store.count(None):
        return 0
    writing: asyncio.Task[None] | None = None
    try:
        for conversations, messages in demo_batches(count, batch=batch):
            if writing is not None:
                await writing
            writing = asyncio.create_task(store.import_conversations(conversations, messages))
            await asyncio.sleep(0)  # the write starts on the store's thread
        if writing is not None:
            await writing
    finally:
        if writing is not None and not writing.done():
            writing.cancel()  # the batch on the store's thread still commits, or not at all
            with contextlib.suppress(asyncio.CancelledError):
                await writing
    return count


async def seed_demo_agents(store: AgentStore, password: str | None) -> int:
    """The demo team; returns how many agents were added or given the password.

    Every demo agent has `password` (one hash, computed off the event loop), also when the
    store kept them from an earlier run (the password printed at start-up is the one that
    works); without a password, new demo agents get one nobody can type.
    """
    password_hash = await asyncio.to_thread(hash_password, password) if password else NO_PASSWORD
    now = now_ms()
    changed = 0
    for agent_id, email, name, role in DEMO_AGENTS:
        held = await store.get_agent(agent_id)
        if held is not None:
            if password:
                await store.update_agent(agent_id, password_hash=password_hash)
                changed += 1
            continue
        if await store.agent_by_email(email) is not None:
            continue  # someone made an account with this address: it stays theirs
        await store.add_agent(
            Agent(
                id=agent_id,
                email=email,
                name=name,
                role=role,
                password_hash=password_hash,
                disabled=False,
                created_at=now,
            )
        )
        changed += 1
    return changed
