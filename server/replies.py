"""What an agent sends: text, a file, a template or a reaction, as a reply to a message or
not. Each is turned into a Draft (checked, its file kept in the media store) and handed to
the inbox, which stores it with its send and broadcasts it.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from server.inbox import Inbox, quoted
from server.integrations.templates import TemplateCatalog, check_parameters, placeholders
from server.media import MediaStore, TooLarge
from server.models import Media, now_ms
from server.store import rules
from server.store.base import ChatStore, Draft, NotFound, Saved, new_id


class Replies:
    """Builds agents' messages and sends them through the inbox."""

    def __init__(
        self, store: ChatStore, inbox: Inbox, media: MediaStore, templates: TemplateCatalog
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.media = media
        self.templates = templates

    async def text(
        self, conversation_id: str, text: str, *, reply_to: str | None, agent_id: str | None
    ) -> Saved:
        """A free-text reply (refused outside the customer-service window)."""
        extra = await self._context(conversation_id, reply_to)
        draft = Draft(type="text", text=text, extra=extra)
        return await self.inbox.send(conversation_id, draft, agent_id=agent_id)

    async def reaction(
        self, conversation_id: str, message_id: str, emoji: str, *, agent_id: str | None
    ) -> Saved:
        """React to a message of the conversation (an empty emoji removes the reaction)."""
        target = await self._target(conversation_id, message_id)
        extra = {"reacted_to": target.wa_message_id, "removed": not emoji}
        draft = Draft(type="reaction", text=emoji or None, extra=extra)
        return await self.inbox.send(conversation_id, draft, agent_id=agent_id)

    async def template(
        self,
        conversation_id: str,
        name: str,
        language: str,
        parameters: Any,
        header_parameters: Any,
        *,
        reply_to: str | None,
        agent_id: str | None,
    ) -> Saved:
        """An approved template with its parameters filled: it reaches the customer even
        outside the window. Stored with the text the customer reads."""
        template = await self.templates.find(name, language)
        body = check_parameters(template, parameters, placeholders(template.body), "parameters")
        header = check_parameters(
            template, header_parameters, placeholders(template.header), "header parameters"
        )
        extra = await self._context(conversation_id, reply_to) or {}
        extra["template"] = {
            "name": template.name,
            "language": template.language,
            "parameters": body,
            "header_parameters": header,
        }
        draft = Draft(type="template", text=template.preview(body, header), extra=extra)
        return await self.inbox.send(conversation_id, draft, agent_id=agent_id)

    async def attachment(
        self,
        conversation_id: str,
        data: bytes,
        mime_type: str,
        filename: str | None,
        caption: str | None,
        *,
        reply_to: str | None,
        agent_id: str | None,
    ) -> Saved:
        """A photo, video, audio file or document: kept in the media store under the new
        message's id, then stored and sent like any reply (uploaded to WhatsApp first)."""
        kind = rules.media_type_for(mime_type)
        limit = rules.MEDIA_LIMITS[kind]
        if len(data) > limit:
            raise TooLarge(f"a {kind} may be at most {limit // rules.MB} MB on WhatsApp")
        media = Media(
            mime_type=mime_type,
            caption=caption or None,
            filename=filename if kind == "document" else None,
            sha256=base64.b64encode(hashlib.sha256(data).digest()).decode(),
            state="ready",
            size=len(data),
        )
        draft = Draft(
            type=kind,
            text=None,
            media=media,
            extra=await self._context(conversation_id, reply_to),
            id=new_id("m", now_ms()),
        )
        # Checked before the file is kept (the write checks again): a closed window must
        # not leave a file behind.
        rules.check_window(await self.store.get_conversation(conversation_id), draft, now_ms())
        assert draft.id is not None
        await self.media.put(draft.id, data, mime_type)
        return await self.inbox.send(conversation_id, draft, agent_id=agent_id)

    async def _target(self, conversation_id: str, message_id: str) -> Any:
        """A message of this conversation that WhatsApp knows (it has a WhatsApp id)."""
        message = await self.store.get_message(message_id)
        if message.conversation_id != conversation_id:
            raise NotFound(f"no message {message_id!r} in conversation {conversation_id!r}")
        if not message.wa_message_id:
            raise NotFound(f"message {message_id!r} has not reached WhatsApp")
        return message

    async def _context(self, conversation_id: str, reply_to: str | None) -> dict[str, Any] | None:
        """What a reply to a message carries: the WhatsApp id it answers (sent as
        `context`) and a copy of it for the thread."""
        if reply_to is None:
            return None
        target = await self._target(conversation_id, reply_to)
        return {"reply_to": target.wa_message_id, "quoted": quoted(target)}
