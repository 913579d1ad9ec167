"""Run a command and write its peak memory: python3 -S peak_rss.py OUT ARGV...

Forks, execs ARGV and writes "MAXRSS_KIB EXIT_CODE" to OUT: the child's
ru_maxrss from wait4, the largest RSS the command or any process it waited
for had. bench.py runs this small interpreter (-S, nothing imported) rather
than forking itself: a child starts as a copy of its parent's memory, and that
copy's size is counted at exec. Exits with the command's exit code.
"""

import os
import sys

out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
with open(out, "w") as handle:
    handle.write("%d %d\n" % (usage.ru_maxrss, code))
sys.exit(code)
