"""Deploys cloudformation/runner.yaml into moto and runs runnerd from its outputs.

Checks that the stack reaches CREATE_COMPLETE and that its core resources
exist (table, roles, security groups, cluster, service, instance profile),
then creates what moto's CloudFormation cannot (the two secrets: the
exchange token's and the runner's empty credential), starts the reference
control plane and runnerd with the stack's outputs, and waits for an
environment to run on an instance tagged as the runner's, in one of the
stack's subnets; the runner refuses a class outside AllowedInstanceTypes and
keeps its credential apart from the exchange token. The run's metrics
records (one a second here) are then checked by metrics_check.py: their
format, and every metric the stack's alarms and dashboard name. Prints one
line per check and 'stack: N passed, N failed'.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import boto3

import metrics_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGION = "us-east-1"


def client(name, moto):
    return boto3.client(
        name, region_name=REGION, endpoint_url=moto, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def start_control_plane(runnerctl):
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
            return proc, "http://" + m.group(1)
    raise SystemExit("runnerctl serve exited without printing its address")


def ctl(runnerctl, url, *args, stdin=None):
    out = subprocess.run(
        [runnerctl, "--json", *args],
        env={**os.environ, "RUNNERCTL_CONTROL_PLANE": url},
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runnerctl", required=True)
    parser.add_argument("--runnerd", required=True)
    parser.add_argument("--moto", default=os.environ.get("MOTO_URL"))
    args = parser.parse_args()
    if not args.moto:
        raise SystemExit("--moto or MOTO_URL is required")

    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
        return ok

    cp, cp_url = start_control_plane(args.runnerctl)
    runnerd = None
    log = tempfile.NamedTemporaryFile(prefix="runnerd-stack-", suffix=".log", delete=False)
    try:
        runner = ctl(args.runnerctl, cp_url, "runner", "create", "--name", "stack", "--region", REGION)
        ec2 = client("ec2", args.moto)
        vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.{i}.0/24", AvailabilityZone=f"{REGION}{zone}")["Subnet"]["SubnetId"]
            for i, zone in enumerate("ab")
        ]
        cfn = client("cloudformation", args.moto)
        stack = f"aws-runner-{runner['id'][:8]}"
        with open(os.path.join(ROOT, "cloudformation", "runner.yaml")) as f:
            body = f.read()
        cfn.create_stack(
            StackName=stack,
            TemplateBody=body,
            Capabilities=["CAPABILITY_IAM"],
            Parameters=[
                {"ParameterKey": "RunnerId", "ParameterValue": runner["id"]},
                {"ParameterKey": "ExchangeToken", "ParameterValue": runner["exchange_token"]},
                {"ParameterKey": "ControlPlaneUrl", "ParameterValue": "https://control-plane.example.com"},
                {"ParameterKey": "VpcId", "ParameterValue": vpc},
                {"ParameterKey": "SubnetIds", "ParameterValue": ",".join(subnets)},
                {"ParameterKey": "RunnerImageDigest", "ParameterValue": "sha256:" + "0" * 64},
            ],
        )
        status = "CREATE_IN_PROGRESS"
        for _ in range(120):
            status = cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
            if not status.endswith("IN_PROGRESS"):
                break
            time.sleep(0.5)
        if not check("the stack reaches CREATE_COMPLETE", status == "CREATE_COMPLETE", status):
            return results
        outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in cfn.describe_stacks(StackName=stack)["Stacks"][0]["Outputs"]}
        resources = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]}

        table = client("dynamodb", args.moto).describe_table(TableName=outputs["TableName"])["Table"]
        keys = [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]]
        check("the table has the key (pk HASH, sk RANGE)", keys == [("pk", "HASH"), ("sk", "RANGE")], keys)
        iam = client("iam", args.moto)
        for role in ["TaskRole", "ExecutionRole", "EnvironmentRole"]:
            check(f"role {role} exists", iam.get_role(RoleName=resources[role])["Role"]["Arn"])
        groups = ec2.describe_security_groups(GroupIds=[outputs["EnvironmentSecurityGroupId"], outputs["RunnerSecurityGroupId"]])["SecurityGroups"]
        check("both security groups are in the VPC", len(groups) == 2 and all(g["VpcId"] == vpc for g in groups), groups)
        ecs = client("ecs", args.moto)
        services = ecs.describe_services(cluster=outputs["ClusterName"], services=[resources["Service"]])["services"]
        check("the ECS service exists in the cluster", len(services) == 1, services)
        check("the instance profile exists", outputs["EnvironmentInstanceProfileArn"].startswith("arn:"), outputs)
        # moto's CloudFormation creates the dashboard (not the alarms or the
        # saved queries): its body, substituted, is JSON naming every alarm.
        dashboard = client("cloudwatch", args.moto).get_dashboard(DashboardName=f"aws-runner-{runner['id']}")
        widgets = json.loads(dashboard["DashboardBody"])["widgets"]
        alarm_arns = [a for w in widgets if w["type"] == "alarm" for a in w["properties"]["alarms"]]
        template = metrics_check.cfn_yaml.loads(body)["Resources"]
        alarm_names = {r["Properties"]["AlarmName"]["Fn::Sub"].replace("${RunnerId}", runner["id"])
                       for r in template.values() if r["Type"] == "AWS::CloudWatch::Alarm"}
        check("the dashboard exists and shows every alarm of the stack",
              len(alarm_names) == 8 and all(a.startswith(f"arn:aws:cloudwatch:{REGION}:") for a in alarm_arns)
              and {a.rsplit(":", 1)[1] for a in alarm_arns} == alarm_names, (alarm_arns, alarm_names))

        # moto's CloudFormation does not create AWS::SecretsManager::Secret:
        # create them as the stack would, the exchange token's and the
        # runner's (empty).
        sm = client("secretsmanager", args.moto)
        exchange_arn = outputs.get("ExchangeTokenSecretArn") or sm.create_secret(
            Name=f"aws-runner/{runner['id']}/exchange-token", SecretString=runner["exchange_token"]
        )["ARN"]
        secret_arn = outputs.get("SecretArn") or sm.create_secret(
            Name=f"aws-runner/{runner['id']}/credential", SecretString="{}"
        )["ARN"]

        env = {
            "PATH": os.environ.get("PATH", ""),
            "AWS_ENDPOINT_URL": args.moto,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNNER_ID": outputs["RunnerId"],
            "RUNNER_REGION": outputs["Region"],
            # The stack names the production control plane; this run uses the local one.
            "RUNNER_CONTROL_PLANE_URL": cp_url,
            "RUNNER_ALLOW_PLAINTEXT": "true",
            "RUNNER_VPC_ID": outputs["VpcId"],
            "RUNNER_SUBNET_IDS": outputs["SubnetIds"],
            "RUNNER_SECURITY_GROUP_ID": outputs["EnvironmentSecurityGroupId"],
            "RUNNER_INSTANCE_PROFILE": outputs["EnvironmentInstanceProfileArn"],
            "RUNNER_AMI": outputs["EnvironmentAmi"],
            "RUNNER_TABLE": outputs["TableName"],
            "RUNNER_SECRET_ID": secret_arn,
            "RUNNER_EXCHANGE_TOKEN_SECRET_ID": exchange_arn,
            "RUNNER_ALLOWED_INSTANCE_TYPES": outputs["AllowedInstanceTypes"],
            "RUNNER_KMS_KEY_ID": outputs["KmsKeyArn"],
            "RUNNER_HEALTH_LISTEN": "127.0.0.1:0",
            "RUNNER_POLL_INTERVAL": "500ms",
            "RUNNER_LOG_FORMAT": "json",
            "RUNNER_METRICS_INTERVAL": "1s",
        }
        runnerd = subprocess.Popen([args.runnerd], env=env, stdout=log, stderr=subprocess.STDOUT)
        cls = ctl(args.runnerctl, cp_url, "class", "create", "--runner", runner["id"], "--name", "Small",
                  "--instance-type", "t3.medium", "--disk-gib", "20")
        created = ctl(args.runnerctl, cp_url, "env", "create", "--runner", runner["id"], "--class", cls["id"],
                      "--repo", "https://github.com/acme/api.git", "--branch", "main")
        got = {}
        stood_in = False
        for _ in range(240):
            got = ctl(args.runnerctl, cp_url, "env", "get", created["id"])
            status = got.get("status") or {}
            if status.get("phase") == "RUNNING":
                break
            if status.get("phase") == "STARTING" and not stood_in:
                # moto runs no user data: stand in for the instance's
                # bootstrap, reporting its checkout ready as
                # deploy/bootstrap.sh does (in tags on the instance).
                now = str(int(time.time()))
                report = {"stage": "ready", "result": "ok", "at": now, "started-at": now,
                          "commit": "0" * 40}
                ec2.create_tags(Resources=[status["instance_id"]],
                                Tags=[{"Key": f"aws-runner:report:{k}", "Value": v} for k, v in report.items()])
                stood_in = True
            time.sleep(0.25)
        status = got.get("status") or {}
        check("it is STARTING until its instance reports its checkout", stood_in, json.dumps(got))
        if check("the environment reaches RUNNING", status.get("phase") == "RUNNING", json.dumps(got)):
            reservations = ec2.describe_instances(InstanceIds=[status["instance_id"]])["Reservations"]
            instance = reservations[0]["Instances"][0]
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            check("its instance carries the runner's tags", tags.get("aws-runner:runner-id") == runner["id"]
                  and tags.get("aws-runner:environment-id") == created["id"], tags)
            check("its instance is in one of the stack's subnets", instance["SubnetId"] in subnets, instance["SubnetId"])
            credential = json.loads(sm.get_secret_value(SecretId=secret_arn)["SecretString"])
            check("the runner keeps its credential in its own secret",
                  bool(credential.get("access_token")) and bool(credential.get("private_key"))
                  and "exchange_token" not in credential, sorted(credential))
            check("the exchange-token secret is left as the stack wrote it",
                  sm.get_secret_value(SecretId=exchange_arn)["SecretString"] == runner["exchange_token"])
            costly = ctl(args.runnerctl, cp_url, "class", "create", "--runner", runner["id"], "--name", "Huge",
                         "--instance-type", "p4d.24xlarge", "--disk-gib", "20")
            answer = ctl(args.runnerctl, cp_url, "call", "validate-class", "--runner", runner["id"], "--class", costly["id"])
            problems = (answer.get("result") or {}).get("problems") or []
            check("the runner refuses a class outside AllowedInstanceTypes",
                  any("is not one of the instance types this runner allows" in p for p in problems), answer)
    finally:
        if runnerd:
            runnerd.terminate()
            try:
                code = runnerd.wait(timeout=30)
                check("runnerd exits 0 on SIGTERM", code == 0, code)
            except subprocess.TimeoutExpired:
                runnerd.kill()
                check("runnerd exits 0 on SIGTERM", False, "still running after 30 s")
            with open(log.name) as output:
                metrics_check.check_run(output.readlines(), runner["id"], check)
        cp.terminate()
        cp.wait(timeout=10)
        if results and not all(results):
            log.seek(0)
            sys.stdout.write(open(log.name).read()[-4000:])
        os.unlink(log.name)
    return results


if __name__ == "__main__":
    results = main()
    passed = sum(results)
    failed = len(results) - passed
    print(f"stack: {passed} passed, {failed} failed")
    sys.exit(1 if failed or not results else 0)
