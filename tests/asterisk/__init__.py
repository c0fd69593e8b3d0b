"""Tests of the Asterisk adapter against recorded Asterisk 22 frames and fake AMI/FastAGI peers."""
