# aws-runner instance bootstrap: checks out the environment's repository.
#
# runnerd sends this script as the instance's user data, after a header of
# shell assignments (AWS_RUNNER_ENVIRONMENT_ID, AWS_RUNNER_REPOSITORY_URL,
# AWS_RUNNER_BRANCH, AWS_RUNNER_COMMIT, AWS_RUNNER_SECRET_ID,
# AWS_RUNNER_REGION). None of them is a secret.
#
# When AWS_RUNNER_SECRET_ID is set, the credential is fetched from that
# Secrets Manager secret, which only this instance may read (the stack's
# environment role allows it only when the secret's aws-runner:instance-arn
# tag is this instance). The secret holds the value of an HTTP Authorization
# header. It is kept in memory, handed to git through the environment for
# the repository's host only, and dropped after the clone: never written to
# disk, never logged, never stored in the clone's configuration.
set -euo pipefail
umask 077

workspace="${AWS_RUNNER_WORKSPACE:-/workspace}"
etc="${AWS_RUNNER_ETC:-/etc/aws-runner}"
attempts="${AWS_RUNNER_SECRET_ATTEMPTS:-40}"

log() { printf 'aws-runner-bootstrap: %s\n' "$*" >&2; }

mkdir -p "$etc" 2>/dev/null || true
if [ -w "$etc" ]; then
  printf 'environment_id=%s\nrepository_url=%s\n' \
    "$AWS_RUNNER_ENVIRONMENT_ID" "$AWS_RUNNER_REPOSITORY_URL" >"$etc/environment"
fi

if [ -d "$workspace/.git" ]; then
  log "repository already checked out in $workspace"
  exit 0
fi

authorization=""
if [ -n "${AWS_RUNNER_SECRET_ID:-}" ]; then
  # The runner tags the secret for this instance right after launch: retry
  # until it can be read.
  for attempt in $(seq 1 "$attempts"); do
    if authorization="$(aws secretsmanager get-secret-value \
      --region "$AWS_RUNNER_REGION" --secret-id "$AWS_RUNNER_SECRET_ID" \
      --query SecretString --output text 2>/dev/null)"; then
      break
    fi
    authorization=""
    if [ "$attempt" -lt "$attempts" ]; then
      sleep "$((attempt < 10 ? attempt : 10))"
    fi
  done
  if [ -z "$authorization" ]; then
    log "cannot read the checkout credential $AWS_RUNNER_SECRET_ID"
    exit 1
  fi
fi

# scheme://host[:port]/ of the repository: the credential goes nowhere else.
origin="$(printf '%s' "$AWS_RUNNER_REPOSITORY_URL" | sed -E 's#^(https://[^/]+)/.*#\1/#')"

clone() {
  if [ -n "$authorization" ]; then
    GIT_CONFIG_COUNT=1 \
      GIT_CONFIG_KEY_0="http.${origin}.extraHeader" \
      GIT_CONFIG_VALUE_0="Authorization: ${authorization}" \
      GIT_TERMINAL_PROMPT=0 git "$@"
  else
    GIT_TERMINAL_PROMPT=0 git "$@"
  fi
}

log "cloning $AWS_RUNNER_REPOSITORY_URL into $workspace"
if [ -n "${AWS_RUNNER_BRANCH:-}" ]; then
  clone clone --branch "$AWS_RUNNER_BRANCH" -- "$AWS_RUNNER_REPOSITORY_URL" "$workspace"
else
  clone clone -- "$AWS_RUNNER_REPOSITORY_URL" "$workspace"
fi
authorization=""
unset authorization
if [ -n "${AWS_RUNNER_COMMIT:-}" ]; then
  git -C "$workspace" checkout --quiet --detach "$AWS_RUNNER_COMMIT"
fi
log "checked out $(git -C "$workspace" rev-parse HEAD)"
