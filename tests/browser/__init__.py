"""The chat page, driven in Debian's Chromium through playwright."""
