"""A real decree cluster for the SDK's tests: one coordinator and two KV
participants in the ring, from the `decree` binary ($DECREE_BIN, which
`make test` sets), in a temporary directory."""

import fcntl
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import decree

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "examples")


def decree_bin() -> str:
    binary = os.environ.get("DECREE_BIN", "")
    if not binary or not os.path.exists(binary):
        pytest.fail("set DECREE_BIN to a built `decree` binary (make test does)", pytrace=False)
    return binary


# Ports leased as the Rust harness leases them (cluster/src/ports.rs): below the
# ephemeral range, so no outgoing connection takes a port while its process is
# down for a restart, and locked (a file per port, shared with every other
# process of the user choosing ports this way) for the whole session.
_LEASES = []
_LOCK_DIR = os.path.join(tempfile.gettempdir(), f"decree-ports-{os.getuid()}")


def free_port() -> int:
    os.makedirs(_LOCK_DIR, exist_ok=True)
    for _ in range(2000):
        port = random.randrange(20_000, 32_000)
        lock = open(os.path.join(_LOCK_DIR, str(port)), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            lock.close()
            continue
        _LEASES.append(lock)
        return port
    pytest.fail("no free port between 20000 and 32000")


def wait_for(what, probe, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = probe()
            if found:
                return found
        except decree.DecreeError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


class Cluster:
    def __init__(self, root):
        self.root = str(root)
        self.procs = {}
        self.url = f"http://127.0.0.1:{free_port()}"

    def spawn(self, name, args, env=None):
        log = open(os.path.join(self.root, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )

    def start(self, participants=("p1", "p2")):
        binary = decree_bin()
        self.spawn_coordinator()
        for name in participants:
            port = free_port()
            self.spawn(
                name,
                [binary, "participant", "--coordinator", self.url, "--name", name, "--join",
                 "--listen", f"127.0.0.1:{port}", "--data-dir", f"{self.root}/{name}"],
            )

        def ready():
            with decree.connect(self.url) as c:
                up = {p.name for p in c.participants() if p.state == "up"}
                return set(participants) <= up and len(c.routing.members()) == len(participants)

        wait_for("the ring to form", ready)
        return self

    def spawn_coordinator(self):
        listen = self.url.removeprefix("http://")
        self.spawn("coordinator", [decree_bin(), "coordinator", "--listen", listen, "--data-dir", f"{self.root}/c"])

    def restart_coordinator(self):
        """kill -9, then the coordinator again on its data directory; back once it lists the participants up."""
        proc = self.procs.pop("coordinator")
        proc.kill()
        proc.wait()
        self.spawn_coordinator()

        def back():
            with decree.connect(self.url) as c:
                return all(p.state == "up" for p in c.participants())

        wait_for("the coordinator to be back", back)

    def service(self, name, script):
        """Starts an example service on the SDK as participant `name`."""
        port = free_port()
        self.spawn(
            name,
            [sys.executable, os.path.join(EXAMPLES, script), "--coordinator", self.url, "--name", name,
             "--listen", f"127.0.0.1:{port}", "--data-dir", f"{self.root}/{name}", "--heartbeat-ms", "200"],
        )

        def up():
            with decree.connect(self.url) as c:
                return any(p.name == name and p.state == "up" for p in c.participants())

        wait_for(f"{name} to enroll", up)
        return f"{self.root}/{name}"

    def log(self, name):
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
            return f.read()

    def stop(self):
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path).start()
    yield c
    c.stop()
