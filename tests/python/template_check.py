"""Evaluates the IAM and KMS policies of cloudformation/runner.yaml where a
claim of the trust boundary rests on them, and checks the template's other
claims (no path between the security groups, the image pinned by digest, the
exchange token apart from the runner's credential).

The template is read with cfn-lint's decoder, its intrinsic functions are
resolved with fixed parameter values and made-up physical ids, and requests
are put to a small evaluator of the policy language: Allow and Deny
statements, Action and Resource wildcards, the condition operators the
template uses (String*, Arn*, with IAM's rule that a negated operator matches
a missing key), policy variables, and for the KMS key the key policy with
its delegation to IAM. It is not AWS's evaluator: it checks what the template
says, and cfn-lint and checkov check the rest.

Prints one line per check and 'template: N passed, N failed'; exits 1 on a
failure.
"""

import argparse
import fnmatch
import os
import re
import sys

from cfnlint.decode import cfn_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCOUNT = "123456789012"
REGION = "eu-west-1"
RUNNER_ID = "8d3b8f3e-6a4e-4e43-9a36-2f1d3c4b5a69"
PARAMETERS = {"RunnerId": RUNNER_ID, "VpcId": "vpc-0a1b2c3d", "ExchangeToken": "ret_x",
              "ControlPlaneUrl": "https://cp.example.com", "RunnerImageDigest": "sha256:" + "0" * 64}
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT}


class Template:
    def __init__(self, path):
        with open(path) as f:
            self.raw = cfn_yaml.loads(f.read())
        self.resources = self.raw["Resources"]
        self.parameters = {k: str(v.get("Default", "")) for k, v in self.raw["Parameters"].items()}
        self.parameters.update(PARAMETERS)

    def ref(self, name):
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.parameters:
            return self.parameters[name]
        kind = self.resources[name]["Type"]
        if kind == "AWS::SecretsManager::Secret":
            secret = self.resolve(self.resources[name]["Properties"]["Name"])
            return f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{secret}-AbCdEf"
        if kind == "AWS::EC2::SecurityGroup":
            return f"sg-{name.lower()}"
        return f"{name}-physical"

    def att(self, name, attribute):
        kind = self.resources[name]["Type"]
        arns = {
            "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT}:role/{name}-physical",
            "AWS::IAM::InstanceProfile": f"arn:aws:iam::{ACCOUNT}:instance-profile/{name}-physical",
            "AWS::KMS::Key": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{name}-physical",
            "AWS::DynamoDB::Table": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}-physical",
            "AWS::CloudWatch::Alarm": f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}-physical",
        }
        if attribute == "Arn":
            return arns[kind]
        if attribute == "GroupId":
            return f"sg-{name.lower()}"
        return f"{name}.{attribute}"

    def resolve(self, node):
        if isinstance(node, list):
            return [self.resolve(n) for n in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (fn, arg), = node.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::GetAtt":
                name, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.att(name, attribute)
            if fn == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))
                return self.sub(text, variables)
            if fn == "Fn::Split":
                return self.resolve(arg[1]).split(arg[0])
            if fn == "Fn::Join":
                return arg[0].join(self.resolve(arg[1]))
            if fn == "Fn::If":
                return self.resolve(arg[1])
        return {k: self.resolve(v) for k, v in node.items()}

    def sub(self, text, variables):
        def one(m):
            name = m.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return variables[name]
            if "." in name:
                return self.att(*name.split(".", 1))
            return self.ref(name)
        return re.sub(r"\$\{([^}]+)\}", one, text)

    def properties(self, name):
        return self.resolve(self.resources[name]["Properties"])

    def role_statements(self, role):
        """Every statement of the role's inline policies and of the
        AWS::IAM::Policy resources attached to it."""
        statements = []
        for policy in self.resources[role]["Properties"].get("Policies", []):
            statements += self.resolve(policy["PolicyDocument"])["Statement"]
        for name, resource in self.resources.items():
            if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role} in resource["Properties"]["Roles"]:
                statements += self.resolve(resource["Properties"]["PolicyDocument"])["Statement"]
        return statements


def listed(value):
    return value if isinstance(value, list) else [value]


def like(pattern, value):
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def substitute(value, context):
    """Policy variables (${ec2:SourceInstanceARN}); None when one is missing."""
    missing = []

    def one(m):
        key = m.group(1).lower()
        if key not in context:
            missing.append(key)
            return ""
        return context[key]
    out = re.sub(r"\$\{([^}]+)\}", one, value)
    return None if missing else out


OPERATORS = {
    "StringEquals": (lambda p, v: p == v, False),
    "StringLike": (like, False),
    "ArnEquals": (like, False),
    "ArnLike": (like, False),
    "StringNotEquals": (lambda p, v: p == v, True),
    "StringNotLike": (like, True),
    "ArnNotEquals": (like, True),
    "ArnNotLike": (like, True),
}


def condition_holds(condition, context):
    for operator, keys in condition.items():
        # ForAllValues: every value of a multi-valued key (aws:TagKeys) must
        # match; a missing key matches (IAM's rule).
        for_all = operator.startswith("ForAllValues:")
        operator = operator.removeprefix("ForAllValues:")
        if operator not in OPERATORS:
            raise SystemExit(f"template_check: condition operator {operator} is not evaluated here")
        test, negated = OPERATORS[operator]
        for key, patterns in keys.items():
            value = context.get(key.lower())
            if for_all:
                if negated:
                    raise SystemExit("template_check: ForAllValues with a negated operator is not evaluated here")
                patterns = [substitute(p, context) for p in listed(patterns)]
                if value is not None and not all(
                        any(p is not None and test(p, v) for p in patterns) for v in listed(value)):
                    return False
                continue
            if value is None:
                if not negated:
                    return False
                continue
            patterns = [substitute(p, context) for p in listed(patterns)]
            hit = any(p is not None and test(p, value) for p in patterns)
            if hit == negated:
                return False
    return True


def matches(statement, action, resource, context):
    if not any(like(a.lower(), action.lower()) for a in listed(statement["Action"])):
        return False
    # A policy variable in Resource (${ec2:SourceInstanceARN}) is substituted
    # from the request; a missing one matches nothing.
    resources = [substitute(r, context) for r in listed(statement["Resource"])]
    if not any(r is not None and like(r, resource) for r in resources):
        return False
    return condition_holds(statement.get("Condition", {}), context)


def identity_allows(statements, action, resource, context=None):
    context = {k.lower(): v for k, v in (context or {}).items()}
    hits = [s["Effect"] for s in statements if matches(s, action, resource, context)]
    return "Allow" in hits and "Deny" not in hits


def key_allows(key_policy, identity, principal, action, key_arn, context):
    """KMS: the key policy allows the principal (by name, or through the
    account root's delegation to an IAM policy that allows), and no
    statement of either denies."""
    ctx = {k.lower(): v for k, v in context.items()}
    ctx["aws:principalarn"] = principal
    root = f"arn:aws:iam::{ACCOUNT}:root"
    allowed = False
    for statement in key_policy["Statement"]:
        named = statement["Principal"]
        names = ["*"] if named == "*" else listed(named.get("AWS", []))
        if not names or not matches(statement, action, key_arn, ctx):
            continue
        if statement["Effect"] == "Deny" and ("*" in names or principal in names):
            return False
        if statement["Effect"] == "Allow":
            if principal in names or "*" in names:
                allowed = True
            elif root in names and identity_allows(identity, action, key_arn, ctx):
                allowed = True
    if any(s["Effect"] == "Deny" and matches(s, action, key_arn, ctx) for s in identity):
        return False
    return allowed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--template", default=os.path.join(ROOT, "cloudformation", "runner.yaml"))
    args = parser.parse_args()
    t = Template(args.template)
    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))

    env_role = t.role_statements("EnvironmentRole")
    task_role = t.role_statements("TaskRole")
    task_arn = t.att("TaskRole", "Arn")
    env_arn = t.att("EnvironmentRole", "Arn")
    key_arn = t.att("TokenKey", "Arn")
    key_policy = t.properties("TokenKey")["KeyPolicy"]
    here = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0here"
    other = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0other"
    env_secret = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:aws-runner/{RUNNER_ID}/environments/e1-AbCdEf"
    credential = t.ref("RunnerCredentialSecret")
    exchange = t.ref("ExchangeTokenSecret")

    # The environment role: its own checkout secret, nothing else.
    for action in ["secretsmanager:GetSecretValue", "secretsmanager:DeleteSecret"]:
        own = {"ec2:SourceInstanceARN": here, "secretsmanager:ResourceTag/aws-runner:instance-arn": here}
        foreign = {"ec2:SourceInstanceARN": here, "secretsmanager:ResourceTag/aws-runner:instance-arn": other}
        check(f"an environment may {action} its own checkout secret",
              identity_allows(env_role, action, env_secret, own))
        check(f"an environment may not {action} another environment's checkout secret",
              not identity_allows(env_role, action, env_secret, foreign))
        check(f"an environment may not {action} an untagged checkout secret",
              not identity_allows(env_role, action, env_secret, {"ec2:SourceInstanceARN": here}))
    for secret, what in [(credential, "the runner's credential"), (exchange, "the exchange token")]:
        check(f"an environment may not read {what}",
              not identity_allows(env_role, "secretsmanager:GetSecretValue", secret,
                                  {"ec2:SourceInstanceARN": here,
                                   "secretsmanager:ResourceTag/aws-runner:instance-arn": here}))
    parameter = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/prod/database-password"
    check("an environment may not read the account's SSM parameters",
          not identity_allows(env_role, "ssm:GetParameter", parameter))
    managed = t.resources["EnvironmentRole"]["Properties"].get("ManagedPolicyArns", [])
    check("the environment role has no managed policy (none can be evaluated here)", not managed, managed)
    grants = [(role, s.get("Sid")) for role in ["EnvironmentRole", "TaskRole", "ExecutionRole"]
              for s in t.role_statements(role)
              if s["Effect"] == "Allow" and "*" in listed(s["Resource"])
              and any(like(a.lower(), "ssm:getparameter") or like(a.lower(), "ssm:getparameters")
                      for a in listed(s["Action"]))]
    check("no statement grants ssm:GetParameter* on *", not grants, grants)
    via_sm = {"kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com"}
    check("an environment may decrypt a checkout secret through Secrets Manager",
          key_allows(key_policy, env_role, env_arn, "kms:Decrypt", key_arn,
                     {**via_sm, "kms:EncryptionContext:SecretARN": env_secret}))
    check("an environment may not decrypt the runner's credential, even through Secrets Manager",
          not key_allows(key_policy, env_role, env_arn, "kms:Decrypt", key_arn,
                         {**via_sm, "kms:EncryptionContext:SecretARN": credential}))

    # The report channel: an instance tags only itself, only report keys.
    report = ["aws-runner:report:stage", "aws-runner:report:detail", "aws-runner:report:at"]
    check("an environment may write its report in tags on its own instance",
          identity_allows(env_role, "ec2:CreateTags", here,
                          {"ec2:SourceInstanceARN": here, "aws:TagKeys": report}))
    check("an environment may not write a report on another instance",
          not identity_allows(env_role, "ec2:CreateTags", other,
                              {"ec2:SourceInstanceARN": here, "aws:TagKeys": report}))
    for keys in [["aws-runner:runner-id"], ["aws-runner:environment-id"], ["Name"],
                 report + ["aws-runner:attempt"], ["aws-runner:reportx"]]:
        check(f"an environment may not tag itself with {keys[-1]}",
              not identity_allows(env_role, "ec2:CreateTags", here,
                                  {"ec2:SourceInstanceARN": here, "aws:TagKeys": keys}))
    check("a principal that is not an instance may not write a report",
          not identity_allows(env_role, "ec2:CreateTags", here, {"aws:TagKeys": report}))
    for action in ["ec2:DeleteTags", "ec2:StopInstances", "ec2:TerminateInstances"]:
        check(f"an environment may not {action} (itself or another)",
              not identity_allows(env_role, action, here, {"ec2:SourceInstanceARN": here}))
    mine = {"ec2:ResourceTag/aws-runner:runner-id": RUNNER_ID}
    check("the runner may read its instances' console output",
          identity_allows(task_role, "ec2:GetConsoleOutput", here, mine))
    check("the runner may not read the console output of an instance that is not its own",
          not identity_allows(task_role, "ec2:GetConsoleOutput", here,
                              {"ec2:ResourceTag/aws-runner:runner-id": "another-runner"}))

    # The task role: RunInstances only for the allowed instance types.
    tagged = {"aws:RequestTag/aws-runner:runner-id": RUNNER_ID}
    instance = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*"
    volume = f"arn:aws:ec2:{REGION}:{ACCOUNT}:volume/*"
    allowed_types = t.parameters["AllowedInstanceTypes"].split(",")
    check("the runner may launch an allowed instance type",
          identity_allows(task_role, "ec2:RunInstances", instance, {**tagged, "ec2:InstanceType": allowed_types[0]}))
    for expensive in ["p4d.24xlarge", "u-6tb1.metal"]:
        check(f"the runner may not launch {expensive} (not in AllowedInstanceTypes)",
              not identity_allows(task_role, "ec2:RunInstances", instance, {**tagged, "ec2:InstanceType": expensive}))
    check("the runner may not launch an instance without its tag",
          not identity_allows(task_role, "ec2:RunInstances", instance, {"ec2:InstanceType": allowed_types[0]}))
    check("the runner may launch the instance's tagged volume (no instance type there)",
          identity_allows(task_role, "ec2:RunInstances", volume, tagged))
    unconditioned = [s.get("Sid") for s in task_role if s["Effect"] == "Allow"
                     and any(like(a.lower(), "ec2:runinstances") for a in listed(s["Action"]))
                     and any(like(r, f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0") for r in listed(s["Resource"]))
                     and "ec2:InstanceType" not in s.get("Condition", {}).get("StringEquals", {})]
    check("every RunInstances grant on instances carries the ec2:InstanceType condition",
          not unconditioned, unconditioned)
    environment = {e["Name"]: e["Value"] for e in
                   t.properties("TaskDefinition")["ContainerDefinitions"][0]["Environment"]}
    check("the runner gets the same allowlist (RUNNER_ALLOWED_INSTANCE_TYPES)",
          environment.get("RUNNER_ALLOWED_INSTANCE_TYPES") == t.parameters["AllowedInstanceTypes"], environment)

    # The key: users' tokens open for the task role only.
    tokens = {"kms:EncryptionContext:aws-runner:purpose": "scm-token"}
    admin = f"arn:aws:iam::{ACCOUNT}:role/Administrator"
    admin_policy = [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]
    check("the task role may decrypt users' tokens",
          key_allows(key_policy, task_role, task_arn, "kms:Decrypt", key_arn, tokens))
    for action in ["kms:Decrypt", "kms:ReEncryptFrom"]:
        check(f"another principal allowed kms:* by IAM may not {action} users' tokens",
              not key_allows(key_policy, admin_policy, admin, action, key_arn, tokens))
    check("the environment role may not decrypt users' tokens",
          not key_allows(key_policy, env_role, env_arn, "kms:Decrypt", key_arn, {**via_sm, **tokens}))
    check("the account still administers the key (kms:PutKeyPolicy through IAM)",
          key_allows(key_policy, admin_policy, admin, "kms:PutKeyPolicy", key_arn, {}))
    check("the account still decrypts what is not a user's token (delegation to IAM)",
          key_allows(key_policy, admin_policy, admin, "kms:Decrypt", key_arn,
                     {"kms:EncryptionContext:aws-runner:purpose": "doctor"}))

    # No path between the two security groups.
    runner_sg, env_sg = t.ref("RunnerSecurityGroup"), t.ref("EnvironmentSecurityGroup")
    rules = []
    for name, resource in t.resources.items():
        props = t.resolve(resource.get("Properties", {}))
        if resource["Type"] == "AWS::EC2::SecurityGroup":
            group = t.ref(name)
            rules += [(group, r) for r in props.get("SecurityGroupIngress", []) + props.get("SecurityGroupEgress", [])]
        if resource["Type"] in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress"):
            rules.append((props["GroupId"], props))
    linked = [r for g, r in rules if {g, r.get("SourceSecurityGroupId"), r.get("DestinationSecurityGroupId")}
              >= {runner_sg, env_sg}]
    check("no rule connects the runner's and the environments' security groups", not linked, linked)
    env_props = t.properties("EnvironmentSecurityGroup")
    check("the environments' group allows nothing in", not env_props.get("SecurityGroupIngress"), env_props)

    # The image: pinned by digest.
    container = t.resources["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    check("the container image is the repository at a digest",
          container["Image"] == {"Fn::Sub": "${RunnerImageRepository}@${RunnerImageDigest}"}, container["Image"])
    digest = t.raw["Parameters"]["RunnerImageDigest"]
    check("RunnerImageDigest must be sha256:<64 hex>",
          digest.get("AllowedPattern") == "^sha256:[0-9a-f]{64}$" and "Default" not in digest, digest)
    repository = re.compile(t.raw["Parameters"]["RunnerImageRepository"]["AllowedPattern"])
    check("RunnerImageRepository refuses a tag or digest",
          repository.match("public.ecr.aws/aws-runner/runnerd")
          and not repository.match("public.ecr.aws/aws-runner/runnerd:latest")
          and not repository.match("public.ecr.aws/aws-runner/runnerd@sha256:" + "0" * 64))
    with open(args.template) as f:
        check("no :latest anywhere in the template", ":latest" not in f.read())
    check("the runner learns its repository (RUNNER_IMAGE_REPOSITORY)",
          environment.get("RUNNER_IMAGE_REPOSITORY") == t.parameters["RunnerImageRepository"], environment)

    # The exchange token cannot overwrite the runner's credential.
    stored = t.resources["RunnerCredentialSecret"]["Properties"]["SecretString"]
    check("the credential secret is created empty, from no parameter", stored == "{}", stored)
    check("the runner reads its credential from RunnerCredentialSecret",
          environment.get("RUNNER_SECRET_ID") == credential, environment)
    check("and the exchange token from the stack's ExchangeTokenSecret",
          environment.get("RUNNER_EXCHANGE_TOKEN_SECRET_ID") == exchange, environment)
    check("the runner may write its credential",
          identity_allows(task_role, "secretsmanager:PutSecretValue", credential))
    check("the runner may read the exchange token",
          identity_allows(task_role, "secretsmanager:GetSecretValue", exchange))
    check("the runner may not read another secret of that name's prefix",
          not identity_allows(task_role, "secretsmanager:GetSecretValue", credential.replace("credential-", "credential-old-")))
    check("the runner may not write the exchange-token secret",
          not identity_allows(task_role, "secretsmanager:PutSecretValue", exchange))
    return results


if __name__ == "__main__":
    results = main()
    passed = sum(results)
    failed = len(results) - passed
    print(f"template: {passed} passed, {failed} failed")
    sys.exit(1 if failed or not results else 0)
