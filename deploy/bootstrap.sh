# aws-runner instance bootstrap: checks out the environment's repository.
#
# runnerd sends this script as the instance's user data, after a header of
# shell assignments (AWS_RUNNER_ENVIRONMENT_ID, AWS_RUNNER_REPOSITORY_URL,
# AWS_RUNNER_REPOSITORY_ORIGIN, AWS_RUNNER_BRANCH, AWS_RUNNER_COMMIT,
# AWS_RUNNER_SECRET_ID, AWS_RUNNER_REGION). None of them is a secret. The
# URL is in its canonical form and the origin (https://host[:port]/) is
# computed by runnerd: this script parses neither.
#
# When AWS_RUNNER_SECRET_ID is set, the credential is fetched from that
# Secrets Manager secret, which only this instance may read (the stack's
# environment role allows it only when the secret's aws-runner:instance-arn
# tag is this instance). The secret holds the value of an HTTP Authorization
# header. It is kept in memory, handed to git through the environment for
# the repository's origin only, and dropped after the clone: never written
# to disk, never logged, never stored in the clone's configuration. Once
# the clone is done or has failed, the secret itself is deleted (a failed
# delete is logged and does not fail the bootstrap: runnerd deletes it with
# the environment).
set -euo pipefail
umask 077

workspace="${AWS_RUNNER_WORKSPACE:-/workspace}"
etc="${AWS_RUNNER_ETC:-/etc/aws-runner}"
attempts="${AWS_RUNNER_SECRET_ATTEMPTS:-40}"

log() { printf 'aws-runner-bootstrap: %s\n' "$*" >&2; }

# Deletes the checkout secret once; never fails (nor changes the exit status).
secret_deleted=""
delete_secret() {
  if [ -n "$secret_deleted" ] || [ -z "${AWS_RUNNER_SECRET_ID:-}" ]; then
    return 0
  fi
  secret_deleted=1
  if aws secretsmanager delete-secret --region "$AWS_RUNNER_REGION" \
    --secret-id "$AWS_RUNNER_SECRET_ID" --force-delete-without-recovery \
    >/dev/null 2>&1; then
    log "deleted the checkout credential $AWS_RUNNER_SECRET_ID"
  else
    log "could not delete the checkout credential $AWS_RUNNER_SECRET_ID; runnerd deletes it with the environment"
  fi
  return 0
}

mkdir -p "$etc" 2>/dev/null || true
if [ -w "$etc" ]; then
  printf 'environment_id=%s\nrepository_url=%s\n' \
    "$AWS_RUNNER_ENVIRONMENT_ID" "$AWS_RUNNER_REPOSITORY_URL" >"$etc/environment"
fi

if [ -d "$workspace/.git" ]; then
  log "repository already checked out in $workspace"
  exit 0
fi

origin="${AWS_RUNNER_REPOSITORY_ORIGIN:-}"
authorization=""
if [ -n "${AWS_RUNNER_SECRET_ID:-}" ]; then
  # The credential goes to the origin only, and the URL must be under it.
  case "$origin" in
  https://*/) ;;
  *)
    log "the repository origin ${origin:-(none)} is not https://host[:port]/: not sending the credential"
    exit 1
    ;;
  esac
  case "$AWS_RUNNER_REPOSITORY_URL" in
  "$origin"?*) ;;
  *)
    log "the repository URL is not under its origin ${origin:-(none)}: not sending the credential"
    exit 1
    ;;
  esac
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
  # From here on, however the script ends, the secret is deleted.
  trap delete_secret EXIT
fi

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
delete_secret
if [ -n "${AWS_RUNNER_COMMIT:-}" ]; then
  git -C "$workspace" checkout --quiet --detach "$AWS_RUNNER_COMMIT"
fi
log "checked out $(git -C "$workspace" rev-parse HEAD)"
