"""Tests of the FreeSWITCH connector."""
