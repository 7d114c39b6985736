"""Checks the reference control plane with an independent gRPC stack.

Builds Python stubs from proto/ with grpcio-tools, starts `runnerctl serve`
on a loopback port, and checks protocol rules from a client that shares no
code with the Rust side. Prints one line per check and a closing
'N passed, N failed' line; exits non-zero on any failure.
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")


def build_stubs(out):
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    files = ["runner/v1/identity.proto", "runner/v1/runner.proto", "admin/v1/admin.proto"]
    for f in files:
        code = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", f])
        if code != 0:
            raise SystemExit(f"protoc failed on {f}")
    sys.path.insert(0, out)


def start_server(runnerctl):
    proc = subprocess.Popen(
        [runnerctl, "serve", "--insecure-plaintext", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUNNERCTL_LOG": "info", "NO_COLOR": "1"},
    )
    for line in proc.stderr:
        m = re.search(r"addr=(\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit("runnerctl serve exited without printing its address")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runnerctl", required=True, help="path to the runnerctl binary")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        build_stubs(out)
        identity = importlib.import_module("runner.v1.identity_pb2")
        identity_grpc = importlib.import_module("runner.v1.identity_pb2_grpc")
        runner = importlib.import_module("runner.v1.runner_pb2")
        runner_grpc = importlib.import_module("runner.v1.runner_pb2_grpc")
        admin = importlib.import_module("admin.v1.admin_pb2")
        admin_grpc = importlib.import_module("admin.v1.admin_pb2_grpc")

        proc, addr = start_server(args.runnerctl)
        results = []

        def check(name, fn):
            try:
                fn()
                results.append(True)
                print(f"ok   {name}")
            except Exception as err:  # noqa: BLE001 - every failure is reported
                results.append(False)
                print(f"FAIL {name}: {err!r}")

        try:
            channel = grpc.insecure_channel(addr)
            grpc.channel_ready_future(channel).result(timeout=10)
            admin_stub = admin_grpc.AdminServiceStub(channel)
            identity_stub = identity_grpc.IdentityServiceStub(channel)
            runner_stub = runner_grpc.RunnerServiceStub(channel)
            created = admin_stub.CreateRunner(admin.CreateRunnerRequest(name="py", region="eu-west-1"), timeout=10)
            state = {}

            def first_exchange():
                resp = identity_stub.ExchangeToken(
                    identity.ExchangeTokenRequest(exchange_token=created.exchange_token), timeout=10
                )
                assert resp.access_token, "empty access token"
                assert resp.runner_id == created.runner.id, resp.runner_id
                state["token"] = resp.access_token

            def second_exchange_refused():
                try:
                    identity_stub.ExchangeToken(
                        identity.ExchangeTokenRequest(exchange_token=created.exchange_token), timeout=10
                    )
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.code()
                    return
                raise AssertionError("the second exchange succeeded")

            def no_bearer_refused():
                try:
                    runner_stub.MarkActive(runner.MarkActiveRequest(), timeout=10)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.code()
                    return
                raise AssertionError("a call without a token succeeded")

            def bearer_accepted_and_fields_named():
                md = [("authorization", f"Bearer {state['token']}")]
                runner_stub.MarkActive(runner.MarkActiveRequest(), metadata=md, timeout=10)
                try:
                    runner_stub.GetEnvironment(runner.GetEnvironmentRequest(environment_id="nope"), metadata=md, timeout=10)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.code()
                    assert "environment_id" in err.details(), err.details()
                    return
                raise AssertionError("a malformed id was accepted")

            check("ExchangeToken succeeds once", first_exchange)
            check("ExchangeToken refuses the same token again", second_exchange_refused)
            check("RunnerService refuses calls without a bearer token", no_bearer_refused)
            check("RunnerService accepts the access token and names bad fields", bearer_accepted_and_fields_named)
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    passed = sum(results)
    failed = len(results) - passed
    print(f"python-protocol: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
