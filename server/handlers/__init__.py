"""Thin aiohttp handlers: validate, call one domain function, map its errors."""
