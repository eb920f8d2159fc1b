"""Ctrl-C while a command starts (torch loading, the op building, the data being read) stops it with one line and
status 1, not a traceback. train_shakespeare.py, sample.py and study.py call this first, before torch is imported;
training then takes Ctrl-C over to save a checkpoint before it stops."""

import signal
import sys


def stop_with_one_line():
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit("stopped by Ctrl-C"))
