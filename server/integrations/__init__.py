"""Outside services: the WhatsApp Cloud API and AI responders."""
