"""Watching every address answer while something restarts the service: ping
at 20 per second from the lab's client to each address, plus one established
TCP session on a secondary address exchanging a line every 50 ms.

    with Watch(lab, addresses, secondary) as watch:
        ...  # restart, reload, upgrade
    watch.report  # lost pings per address, failed exchanges

A ping is lost when a later one came back but it did not (ping's icmp_seq
numbers say which), or when the last ones never came back."""

import re
import signal
import subprocess
import threading
import time

INTERVAL = 0.05  # 20 per second, as the issue measures it (root may go below 0.2 s)


class Pinger:
    """ping -i 0.05 from namespace NS to ADDRESS, in the background."""

    def __init__(self, ns, address):
        self.address = address
        self.process = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-i", str(INTERVAL),
                                         "-W", "1", address], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)

    def stop(self):
        """(sent, [lost sequence numbers])."""
        self.process.send_signal(signal.SIGINT)
        out = self.process.communicate(timeout=20)[0]
        answered = {int(seq) for seq in re.findall(r"icmp_seq=(\d+) ttl=", out)}
        sent = re.search(r"(\d+) packets transmitted", out)
        sent = int(sent.group(1)) if sent else 0
        # the last request may still be on its way when ping is interrupted
        lost = sorted(set(range(1, max(sent - 1, 0) + 1)) - answered)
        return sent, lost


class Watch:
    """Pings to every address and a TCP session on SECONDARY, during the block."""

    def __init__(self, lab, addresses, secondary):
        self.lab, self.addresses, self.secondary = lab, list(addresses), secondary
        self.exchanges = self.failed = 0
        self.report = None

    def __enter__(self):
        self.session = self.lab.session(self.lab.client, self.secondary)
        assert self.session.exchange("before"), "the TCP session does not work to begin with"
        self.pingers = [Pinger(self.lab.client, address) for address in self.addresses]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._talk, daemon=True)
        self.thread.start()
        time.sleep(0.5)  # every pinger under way
        return self

    def _talk(self):
        n = 0
        while not self.stopping.is_set():
            n += 1
            self.exchanges += 1
            if not self.session.exchange("line %d" % n):
                self.failed += 1
                return  # a broken session stays broken
            time.sleep(INTERVAL)

    def __exit__(self, *exc):
        time.sleep(0.5)  # pings after the operation too
        self.stopping.set()
        self.thread.join(timeout=10)
        results = {pinger.address: pinger.stop() for pinger in self.pingers}
        alive = self.session.exchange("after")
        self.report = {"pings": results, "tcp exchanges": self.exchanges, "tcp failed": self.failed,
                       "tcp alive after": alive}
        return False

    def lost(self):
        """{address: lost sequence numbers} where any was lost."""
        return {address: lost for address, (_, lost) in self.report["pings"].items() if lost}

    def check(self, what):
        """Assert that nothing was lost and enough was sent to tell."""
        print("%s: %s" % (what, self.summary()))
        for address, (sent, _) in self.report["pings"].items():
            assert sent >= 15, "%s: only %d pings to %s: nothing to tell" % (what, sent, address)
        assert self.lost() == {}, "%s: pings lost: %s" % (what, self.lost())
        assert self.report["tcp failed"] == 0 and self.report["tcp alive after"], \
            "%s: the TCP session to %s broke: %s" % (what, self.secondary, self.report)

    def summary(self):
        sent = sum(s for s, _ in self.report["pings"].values())
        lost = sum(len(lost) for _, lost in self.report["pings"].values())
        return "%d pings to %d addresses, %d lost; TCP session on %s: %d exchanges, %s" % (
            sent, len(self.addresses), lost, self.secondary, self.report["tcp exchanges"],
            "alive" if self.report["tcp failed"] == 0 and self.report["tcp alive after"] else "BROKEN")
