#!/usr/bin/env python3
"""The takeover and upgrade tests' writer: appends numbered lines ("line N") through one O_APPEND
descriptor, one every 0.2 ms, until the file STOP exists. A failed or short write is written to
ERR and ends it with status 1, so the test sees every error a caller would.
Usage: appender.py PATH STOP ERR"""
import os
import sys
import time

path, stop, err = sys.argv[1:4]
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while not os.path.exists(stop):
        line = b"line %d\n" % i
        if os.write(fd, line) != len(line):
            raise OSError("short write at line %d" % i)
        i += 1
        time.sleep(0.0002)
    os.close(fd)
except Exception as e:
    open(err, "w").write("%s\n" % e)
    sys.exit(1)
