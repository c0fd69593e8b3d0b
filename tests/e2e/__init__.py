"""End-to-end tests against the real sandbox Asterisk, SIPp and the demo."""
