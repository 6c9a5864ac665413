"""Live Chat server: a warm, realtime inbox for WhatsApp conversations."""
