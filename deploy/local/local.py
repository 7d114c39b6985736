"""The local stack: emulated AWS (moto), the stack template deployed into it,
the reference control plane and runnerd, all on 127.0.0.1.

  local.py up   --runnerctl PATH --runnerd PATH [--image NAME]
                start (or reuse) and bring an environment to RUNNING; with
                --image, runnerd runs inside that image (buildah, chroot)
  local.py down stop exactly what `up` started

State (endpoints, process ids, ids) lives in .tools/local/state.json (or in
$LOCAL_STATE_DIR); logs beside it. Nothing here touches a real AWS account: every client is pointed
at the local moto with dummy credentials.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE_DIR = os.environ.get("LOCAL_STATE_DIR") or os.path.join(ROOT, ".tools", "local")
STATE = os.path.join(STATE_DIR, "state.json")
REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_EC2_METADATA_DISABLED": "true"}
# buildah without a daemon: files copied per layer, the process in a chroot
# on the host's network (so 127.0.0.1 is the host's).
BUILDAH_ENV = {"STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}


def buildah(*args):
    out = subprocess.run(["buildah", *args], env={**os.environ, **BUILDAH_ENV}, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"buildah {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def in_image(container, env, argv):
    """`argv` run inside `container` (a working container of the image) with `env`."""
    flags = [f for k, v in env.items() if k != "PATH" for f in ("--env", f"{k}={v}")]
    return ["buildah", "run", "--network", "host", *flags, container, "--", *argv]


def say(message):
    print(f"local: {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def load_state():
    try:
        with open(STATE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save_state(state):
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(STATE + ".tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(STATE + ".tmp", STATE)


def spawn(name, argv, env=None):
    log = open(os.path.join(STATE_DIR, f"{name}.log"), "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc.pid


def wait_http(url, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{what} did not answer at {url} within {seconds} s (see {STATE_DIR})")


def client(name, moto):
    return boto3.client(name, region_name=REGION, endpoint_url=moto,
                        aws_access_key_id="local", aws_secret_access_key="local")


def ctl(runnerctl, cp_url, *args):
    out = subprocess.run([runnerctl, "--json", *args], env={**os.environ, "RUNNERCTL_CONTROL_PLANE": cp_url},
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"runnerctl {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def up(args):
    os.makedirs(STATE_DIR, exist_ok=True)
    state = load_state()
    if state.get("image") != args.image and state.get("runnerd_pid") and alive(state["runnerd_pid"]):
        raise SystemExit(f"runnerd is running {'in ' + state['image'] if state.get('image') else 'from the build'}: "
                         "run deploy/local/down first")
    venv_bin = os.path.dirname(sys.executable)

    if state.get("moto_pid") and alive(state["moto_pid"]):
        say(f"reusing moto at {state['moto_url']}")
    else:
        port = free_port()
        state["moto_pid"] = spawn("moto", [os.path.join(venv_bin, "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
        state["moto_url"] = f"http://127.0.0.1:{port}"
        for key in ["stack", "runner_id", "cp_pid", "runnerd_pid"]:
            state.pop(key, None)
        wait_http(state["moto_url"] + "/moto-api/", "moto")
        say(f"started moto at {state['moto_url']} (pid {state['moto_pid']})")
    save_state(state)
    moto = state["moto_url"]

    if state.get("cp_pid") and alive(state["cp_pid"]):
        say(f"reusing the control plane at {state['cp_url']}")
    else:
        port = free_port()
        state["cp_url"] = f"http://127.0.0.1:{port}"
        state["cp_pid"] = spawn("control-plane", [args.runnerctl, "serve", "--insecure-plaintext",
                                                  "--listen", f"127.0.0.1:{port}"])
        for key in ["stack", "runner_id", "runnerd_pid"]:
            state.pop(key, None)
        deadline = time.time() + 30
        while True:
            try:
                ctl(args.runnerctl, state["cp_url"], "runner", "list")
                break
            except SystemExit:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        say(f"started the reference control plane at {state['cp_url']} (pid {state['cp_pid']})")
    save_state(state)
    cp_url = state["cp_url"]

    if not state.get("stack"):
        runner = ctl(args.runnerctl, cp_url, "runner", "create", "--name", "local", "--region", REGION)
        ec2 = client("ec2", moto)
        vpc = ec2.create_vpc(CidrBlock="10.50.0.0/16")["Vpc"]["VpcId"]
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.50.{i}.0/24",
                                     AvailabilityZone=f"{REGION}{z}")["Subnet"]["SubnetId"] for i, z in enumerate("ab")]
        cfn = client("cloudformation", moto)
        stack = f"aws-runner-{runner['id'][:8]}"
        with open(os.path.join(ROOT, "cloudformation", "runner.yaml")) as f:
            body = f.read()
        say(f"deploying cloudformation/runner.yaml as {stack}")
        cfn.create_stack(StackName=stack, TemplateBody=body, Capabilities=["CAPABILITY_IAM"], Parameters=[
            {"ParameterKey": "RunnerId", "ParameterValue": runner["id"]},
            {"ParameterKey": "ExchangeToken", "ParameterValue": runner["exchange_token"]},
            {"ParameterKey": "ControlPlaneUrl", "ParameterValue": "https://control-plane.invalid"},
            {"ParameterKey": "VpcId", "ParameterValue": vpc},
            {"ParameterKey": "SubnetIds", "ParameterValue": ",".join(subnets)},
            # No image runs here (moto's ECS starts no task); any digest will do.
            {"ParameterKey": "RunnerImageDigest", "ParameterValue": "sha256:" + "0" * 64},
        ])
        for _ in range(120):
            status = cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
            if not status.endswith("IN_PROGRESS"):
                break
            time.sleep(0.5)
        if status != "CREATE_COMPLETE":
            raise SystemExit(f"the stack ended in {status}")
        outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in cfn.describe_stacks(StackName=stack)["Stacks"][0]["Outputs"]}
        # moto's CloudFormation skips AWS::SecretsManager::Secret; create them as the stack would:
        # the exchange token's, and the runner's credential (empty).
        sm = client("secretsmanager", moto)
        if not outputs.get("ExchangeTokenSecretArn"):
            outputs["ExchangeTokenSecretArn"] = sm.create_secret(
                Name=f"aws-runner/{runner['id']}/exchange-token", SecretString=runner["exchange_token"])["ARN"]
        if not outputs.get("SecretArn"):
            outputs["SecretArn"] = sm.create_secret(
                Name=f"aws-runner/{runner['id']}/credential", SecretString="{}")["ARN"]
        # moto's CloudFormation stores the key policy as an object, and its KMS
        # then answers DescribeKey with HTTP 500; store the same policy as the
        # JSON text KMS keeps.
        kms = client("kms", moto)
        policy = kms.get_key_policy(KeyId=outputs["KmsKeyArn"], PolicyName="default")["Policy"]
        if not isinstance(policy, str):
            kms.put_key_policy(KeyId=outputs["KmsKeyArn"], PolicyName="default", Policy=json.dumps(policy))
        state.update(stack=stack, runner_id=runner["id"], outputs=outputs, subnets=subnets)
        save_state(state)
        say(f"stack {stack} is CREATE_COMPLETE")

    if state.get("runnerd_pid") and alive(state["runnerd_pid"]):
        say(f"reusing runnerd (pid {state['runnerd_pid']})")
    else:
        o = state["outputs"]
        health = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "AWS_ENDPOINT_URL": moto, **CREDENTIALS,
               "RUNNER_ID": o["RunnerId"], "RUNNER_REGION": o["Region"],
               "RUNNER_CONTROL_PLANE_URL": cp_url, "RUNNER_ALLOW_PLAINTEXT": "true",
               "RUNNER_VPC_ID": o["VpcId"], "RUNNER_SUBNET_IDS": o["SubnetIds"],
               "RUNNER_SECURITY_GROUP_ID": o["EnvironmentSecurityGroupId"],
               "RUNNER_INSTANCE_PROFILE": o["EnvironmentInstanceProfileArn"], "RUNNER_AMI": o["EnvironmentAmi"],
               "RUNNER_TABLE": o["TableName"], "RUNNER_SECRET_ID": o["SecretArn"],
               "RUNNER_EXCHANGE_TOKEN_SECRET_ID": o["ExchangeTokenSecretArn"],
               "RUNNER_ALLOWED_INSTANCE_TYPES": o["AllowedInstanceTypes"], "RUNNER_KMS_KEY_ID": o["KmsKeyArn"],
               "RUNNER_HEALTH_LISTEN": f"127.0.0.1:{health}", "RUNNER_LOG_FORMAT": "json"}
        state["health_url"] = f"http://127.0.0.1:{health}"
        log = os.path.join(STATE_DIR, "runnerd.log")
        state["runnerd_log_offset"] = os.path.getsize(log) if os.path.exists(log) else 0
        if args.image:
            state["runnerd_container"] = buildah("from", "--pull-never", args.image)
            state["image"] = args.image
            state["runnerd_pid"] = spawn("runnerd", in_image(state["runnerd_container"], env, ["/runnerd"]),
                                         env={**os.environ, **BUILDAH_ENV})
        else:
            state.pop("image", None)
            state["runnerd_pid"] = spawn("runnerd", [args.runnerd], env=env)
        save_state(state)
        where = f" in {args.image}" if args.image else ""
        say(f"started runnerd{where} (pid {state['runnerd_pid']}), health at {state['health_url']}")

    runner_id = state["runner_id"]
    if not state.get("env_id"):
        cls = ctl(args.runnerctl, cp_url, "class", "create", "--runner", runner_id, "--name", "Small",
                  "--instance-type", "t3.medium", "--disk-gib", "20")
        env = ctl(args.runnerctl, cp_url, "env", "create", "--runner", runner_id, "--class", cls["id"],
                  "--repo", "https://github.com/octocat/Hello-World.git", "--branch", "master")
        state.update(class_id=cls["id"], env_id=env["id"])
        save_state(state)
    say(f"waiting for environment {state['env_id']} to run")
    got = {}
    for _ in range(240):
        got = ctl(args.runnerctl, cp_url, "env", "get", state["env_id"])
        status = got.get("status") or {}
        if status.get("phase") == "RUNNING":
            break
        if status.get("phase") == "STARTING" and status.get("content_stage") == "UNSPECIFIED":
            # moto runs no user data (and the clone would need the internet):
            # stand in for the instance's bootstrap, reporting its checkout
            # ready in the tags deploy/bootstrap.sh writes.
            now = str(int(time.time()))
            tags = {"stage": "ready", "result": "ok", "at": now, "started-at": now, "commit": "0" * 40}
            client("ec2", moto).create_tags(
                Resources=[status["instance_id"]],
                Tags=[{"Key": f"aws-runner:report:{k}", "Value": v} for k, v in tags.items()])
        time.sleep(0.25)
    status = got.get("status") or {}
    if status.get("phase") != "RUNNING":
        raise SystemExit(f"the environment did not reach RUNNING: {json.dumps(got)} (logs in {STATE_DIR})")
    failing = setup_checks(state)
    if failing:
        raise SystemExit(f"the runner is DEGRADED: setup checks fail: {failing} (logs in {STATE_DIR})")
    runner = {}
    for _ in range(240):
        runner = ctl(args.runnerctl, cp_url, "runner", "get", runner_id)
        if runner.get("phase") == "ACTIVE":
            break
        time.sleep(0.25)
    if runner.get("phase") != "ACTIVE":
        raise SystemExit(f"the runner is {runner.get('phase')}: {runner.get('degraded_message')} (logs in {STATE_DIR})")
    print()
    print(f"  moto (emulated AWS)   {moto}")
    print(f"  control plane         {cp_url}")
    print(f"  runnerd health        {state['health_url']}/readyz")
    print(f"  runner                {runner_id} ACTIVE")
    print(f"  environment           {state['env_id']} RUNNING on {status['instance_id']} in {status['availability_zone']}")
    print(f"  state and logs        {STATE_DIR}")
    print()
    # The binaries stay in the build directory: the next steps put it on PATH.
    bin_dir = os.path.dirname(os.path.abspath(args.runnerctl))
    if not shutil.which("runnerctl", path=bin_dir):
        raise SystemExit(f"no runnerctl in {bin_dir}")
    print("Next:")
    print(f"  export PATH={bin_dir}:$PATH RUNNERCTL_CONTROL_PLANE={cp_url}")
    print(f"  runnerctl env list")
    print(f"  runnerctl env create --runner {runner_id} --class {state['class_id']} --repo https://github.com/acme/api.git")
    print(f"  runnerctl env stop {state['env_id']}")
    print("  deploy/local/down")


def setup_checks(state, seconds=60):
    """Waits for runnerd's start checks (its log since it started): None when
    they pass, else the failures as `check: problem; ...`."""
    log = os.path.join(STATE_DIR, "runnerd.log")
    deadline = time.time() + seconds
    while time.time() < deadline:
        failures = []
        with open(log, "rb") as f:
            f.seek(state.get("runnerd_log_offset", 0))
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                message = event.get("message") or event.get("fields", {}).get("message")
                if message == "setup checks pass":
                    return None
                if message == "setup check failed":
                    failures.append(f"{event.get('check')}: {event.get('problem')}")
        if failures:
            return "; ".join(failures)
        time.sleep(0.2)
    raise SystemExit(f"runnerd's setup checks did not finish within {seconds} s (logs in {STATE_DIR})")


def down(_args):
    state = load_state()
    if not state:
        say("nothing is running")
        return
    for name in ["runnerd_pid", "cp_pid", "moto_pid"]:
        pid = state.get(name)
        if pid and alive(pid):
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if not alive(pid):
                    break
                time.sleep(0.1)
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
            say(f"stopped {name[:-4]} (pid {pid})")
    if state.get("runnerd_container"):
        buildah("rm", state["runnerd_container"])
        say(f"removed the container {state['runnerd_container']}")
    os.remove(STATE)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--runnerctl", required=True)
    p_up.add_argument("--runnerd", required=True)
    p_up.add_argument("--image", help="run runnerd inside this image (deploy/image/build) with buildah")
    sub.add_parser("down")
    args = parser.parse_args()
    {"up": up, "down": down}[args.command](args)


if __name__ == "__main__":
    main()
