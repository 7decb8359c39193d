"""Imported first by the fork server of the rank processes (trt_layers.ranks.RankPool), and only there.

Ctrl-C reaches every process of the terminal's process group, the fork server too, while it is still importing
torch for the ranks (Python's fork server ignores SIGINT only once it has loaded its preload modules): it would
print a traceback. The parent process handles the interrupt and stops the ranks; the server ends with it.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
