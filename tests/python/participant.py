"""A decree participant in Python, speaking only the documented gRPC protocol
(proto/decree/v1/*.proto, compiled with grpcio-tools at start).

Payload: UTF-8 lines `set <key> <value>`; a line `fail` votes NO. State and
prepared branches live in one JSON file, replaced atomically and fsynced
before a YES vote and after each commit, so the participant survives kill -9.

    python participant.py --proto DIR --coordinator URL --name NAME --port PORT --state FILE [--gen-dir DIR]
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent import futures


def generate(proto_dir, out):
    """Compiles the .proto files into `out` (a new temporary directory if None) and imports them."""
    from grpc_tools import protoc
    import grpc_tools

    out = out or tempfile.mkdtemp(prefix="decree-py-")
    os.makedirs(out, exist_ok=True)
    files = [os.path.join("decree", "v1", f) for f in os.listdir(os.path.join(proto_dir, "decree", "v1"))]
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"] + files)
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)


class Store:
    """Committed values, prepared branches and decided txids, in one JSON file."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        else:
            data = {"values": {}, "prepared": {}, "decided": {}}
        self.values, self.prepared, self.decided = data["values"], data["prepared"], data["decided"]
        self.locks = {key: txid for txid, writes in self.prepared.items() for key in writes}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"values": self.values, "prepared": self.prepared, "decided": self.decided}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def serve(args):
    import grpc
    from decree.v1 import common_pb2, participant_pb2, participant_pb2_grpc, registry_pb2, registry_pb2_grpc

    store = Store(args.state)

    def parse(payload):
        writes = {}
        for line in payload.decode("utf-8").splitlines():
            parts = line.split()
            if parts == ["fail"]:
                return None, "the python participant was asked to fail"
            if len(parts) != 3 or parts[0] != "set":
                return None, f"bad line {line!r}: expected `set <key> <value>`"
            writes[parts[1]] = parts[2]
        return writes, ""

    def release(txid):
        for key in [k for k, holder in store.locks.items() if holder == txid]:
            del store.locks[key]

    class Participant(participant_pb2_grpc.ParticipantServicer):
        def Prepare(self, request, context):
            txid = request.txid
            with store.lock:
                if txid in store.decided:
                    committed = store.decided[txid] == "committed"
                    vote = common_pb2.VOTE_YES if committed else common_pb2.VOTE_NO
                    return participant_pb2.PrepareResponse(vote=vote, reason="" if committed else "already aborted")
                if txid in store.prepared:
                    return participant_pb2.PrepareResponse(vote=common_pb2.VOTE_YES)
                writes, reason = parse(request.payload)
                if writes is None:
                    store.decided[txid] = "aborted"
                    return participant_pb2.PrepareResponse(vote=common_pb2.VOTE_NO, reason=reason)
                busy = [k for k in writes if store.locks.get(k, txid) != txid]
                if busy:
                    return participant_pb2.PrepareResponse(vote=common_pb2.VOTE_NO, reason=f"lock conflict on {busy[0]!r}")
                if not writes:
                    vote = common_pb2.VOTE_COMMITTED if request.one_phase else common_pb2.VOTE_READ_ONLY
                    return participant_pb2.PrepareResponse(vote=vote)
                if request.one_phase:
                    store.values.update(writes)
                    store.decided[txid] = "committed"
                    store.save()
                    return participant_pb2.PrepareResponse(vote=common_pb2.VOTE_COMMITTED)
                for key in writes:
                    store.locks[key] = txid
                store.prepared[txid] = writes
                store.save()  # the prepared record is durable before YES
                return participant_pb2.PrepareResponse(vote=common_pb2.VOTE_YES)

        def Commit(self, request, context):
            txid = request.txid
            with store.lock:
                if store.decided.get(txid) == "aborted":
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"transaction {txid} was aborted here")
                writes = store.prepared.pop(txid, None)
                if writes is not None:
                    store.values.update(writes)
                    store.decided[txid] = "committed"
                    release(txid)
                    store.save()
            return participant_pb2.CommitResponse()

        def Abort(self, request, context):
            txid = request.txid
            with store.lock:
                if store.decided.get(txid) == "committed":
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"transaction {txid} was committed here")
                store.prepared.pop(txid, None)
                store.decided[txid] = "aborted"
                release(txid)
                store.save()
            return participant_pb2.AbortResponse()

        def ListInDoubt(self, request, context):
            with store.lock:
                branches = [
                    participant_pb2.InDoubtBranch(txid=txid, age_ms=0, locked_keys=sorted(writes))
                    for txid, writes in sorted(store.prepared.items())
                ]
            return participant_pb2.ListInDoubtResponse(branches=branches, participant=args.name)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    participant_pb2_grpc.add_ParticipantServicer_to_server(Participant(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()

    # Enroll, then heartbeat; enroll again whenever the coordinator does not know us.
    registry = registry_pb2_grpc.RegistryStub(grpc.insecure_channel(args.coordinator.removeprefix("http://")))
    address = f"http://127.0.0.1:{args.port}"
    enrolled = False
    while True:
        try:
            if not enrolled:
                registry.Enroll(
                    registry_pb2.EnrollRequest(name=args.name, address=address, role=registry_pb2.ROLE_SERVICE), timeout=2
                )
                enrolled = True
                print(f"enrolled as {args.name}", flush=True)
            else:
                enrolled = registry.Heartbeat(registry_pb2.HeartbeatRequest(name=args.name), timeout=2).known
        except grpc.RpcError as err:
            print(f"coordinator: {err.code()}", flush=True)
            enrolled = False
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--gen-dir", help="where to put the generated code (default: a new temporary directory)")
    args = parser.parse_args()
    generate(args.proto, args.gen_dir)
    serve(args)


if __name__ == "__main__":
    main()
