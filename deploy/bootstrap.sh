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
#
# Progress is reported to runnerd in tags on this instance itself (the only
# instance the environment role may tag, and only with aws-runner:report:*
# keys): the stage (credential, clone, checkout, ready), whether it failed
# and a short reason (printable ASCII, at most 200 characters; never a
# credential: git's messages carry none, the URL has no user info), when,
# and the commit once ready. runnerd reads them with the DescribeInstances
# it makes anyway, and treats them as untrusted text. The instance's id
# comes from cloud-init's record of it (AWS_RUNNER_INSTANCE_ID overrides
# it, for tests).
#
# Once the content is ready, the script installs a small service, started at
# every boot, that reports since when no client (an established TCP
# connection to one of AWS_RUNNER_CLIENT_PORTS, SSH's 22 by default: IDEs
# connect through it) has been connected, in aws-runner:report:idle-since
# (empty while one is). It looks every 30 s and writes the tag only when
# that changes, never periodically: runnerd stops the environment once it
# has been idle for the spec's timeout.disconnected.
set -euo pipefail
umask 077

workspace="${AWS_RUNNER_WORKSPACE:-/workspace}"
etc="${AWS_RUNNER_ETC:-/etc/aws-runner}"
attempts="${AWS_RUNNER_SECRET_ATTEMPTS:-40}"

log() { printf 'aws-runner-bootstrap: %s\n' "$*" >&2; }

# This instance's id, as cloud-init (which runs this script) recorded it.
instance_id="${AWS_RUNNER_INSTANCE_ID:-}"
if [ -z "$instance_id" ] && [ -r /var/lib/cloud/data/instance-id ]; then
  instance_id="$(cat /var/lib/cloud/data/instance-id)"
fi
started_at="$(date +%s)"

# A reason as a report may carry it: one line of printable ASCII without
# quotes or backslashes, at most 200 characters.
clean() { printf '%s' "$*" | tr '\n\t' '  ' | tr -cd '[:alnum:] ._:/(),=+-' | cut -c1-200; }

# Writes the report tags: report STAGE ok|failed [DETAIL] [COMMIT]. Never
# fails the script; tried a few times (the ready report is what matters).
report() {
  local stage="$1" result="$2" detail commit tags attempt
  detail="$(clean "${3:-}")"
  commit="${4:-}"
  if [ -z "$instance_id" ]; then
    log "no instance id: cannot report stage $stage ($result)"
    return 0
  fi
  tags="[{\"Key\":\"aws-runner:report:stage\",\"Value\":\"$stage\"}"
  tags="$tags,{\"Key\":\"aws-runner:report:result\",\"Value\":\"$result\"}"
  tags="$tags,{\"Key\":\"aws-runner:report:detail\",\"Value\":\"$detail\"}"
  tags="$tags,{\"Key\":\"aws-runner:report:at\",\"Value\":\"$(date +%s)\"}"
  tags="$tags,{\"Key\":\"aws-runner:report:started-at\",\"Value\":\"$started_at\"}"
  tags="$tags,{\"Key\":\"aws-runner:report:commit\",\"Value\":\"$commit\"}]"
  for attempt in 1 2 3 4 5; do
    if aws ec2 create-tags --region "$AWS_RUNNER_REGION" --resources "$instance_id" \
      --tags "$tags" >/dev/null 2>&1; then
      log "reported stage $stage ($result)"
      return 0
    fi
    if [ "$attempt" -lt 5 ]; then
      sleep "$attempt"
    fi
  done
  log "could not report stage $stage ($result)"
  return 0
}

# Reports the stage as failed, with the reason, and ends the bootstrap.
fail() {
  local stage="$1"
  shift
  log "$*"
  report "$stage" failed "$*"
  exit 1
}

# The idle watcher: one look (AWS_RUNNER_IDLE_ONCE=1) or a loop. The state
# it last wrote is kept in $etc/idle-state, which the service clears when it
# starts: one write per boot, then one per change.
idle_watcher() {
  cat <<'WATCHER'
#!/bin/bash
set -uo pipefail
state_file="${AWS_RUNNER_ETC:-/etc/aws-runner}/idle-state"
ports="${AWS_RUNNER_CLIENT_PORTS:-22}"
connected() {
  local port
  for port in ${ports//,/ }; do
    if ss -Htn state established "( sport = :$port )" 2>/dev/null | grep -q .; then
      return 0
    fi
  done
  return 1
}
while true; do
  if connected; then now=connected; value=""; else now=idle; value="$(date +%s)"; fi
  if [ "$now" != "$(cat "$state_file" 2>/dev/null)" ]; then
    if aws ec2 create-tags --region "$AWS_RUNNER_REGION" --resources "$AWS_RUNNER_INSTANCE_ID" \
      --tags "Key=aws-runner:report:idle-since,Value=$value" >/dev/null 2>&1; then
      printf '%s' "$now" >"$state_file"
      printf 'aws-runner-idle: %s\n' "$now" >&2
    fi
  fi
  if [ "${AWS_RUNNER_IDLE_ONCE:-}" = 1 ]; then
    exit 0
  fi
  sleep 30
done
WATCHER
}

install_idle_watcher() {
  if [ -z "$instance_id" ] || ! command -v systemctl >/dev/null 2>&1 || [ ! -d /etc/systemd/system ]; then
    log "no systemd or no instance id: the idle watcher is not installed"
    return 0
  fi
  idle_watcher >/usr/local/bin/aws-runner-idle
  chmod 0755 /usr/local/bin/aws-runner-idle
  cat >/etc/systemd/system/aws-runner-idle.service <<UNIT
[Unit]
Description=aws-runner: report since when no client is connected
After=network-online.target

[Service]
Environment=AWS_RUNNER_REGION=$AWS_RUNNER_REGION
Environment=AWS_RUNNER_INSTANCE_ID=$instance_id
Environment=AWS_RUNNER_ETC=$etc
ExecStartPre=/bin/rm -f $etc/idle-state
ExecStart=/usr/local/bin/aws-runner-idle
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload && systemctl enable --now aws-runner-idle.service ||
    log "could not start the idle watcher"
  return 0
}

# The watcher itself, for one look (tests): AWS_RUNNER_IDLE_ONCE=1.
if [ "${AWS_RUNNER_IDLE_ONCE:-}" = 1 ]; then
  mkdir -p "$etc"
  AWS_RUNNER_REGION="$AWS_RUNNER_REGION" AWS_RUNNER_INSTANCE_ID="$instance_id" AWS_RUNNER_ETC="$etc" \
    bash <(idle_watcher)
  exit $?
fi

# The last line git wrote on a failure (git never prints the header).
last_line() { printf '%s\n' "$1" | grep -v '^[[:space:]]*$' | tail -n 1 || true; }

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
  report ready ok "" "$(git -C "$workspace" rev-parse HEAD 2>/dev/null || true)"
  install_idle_watcher
  exit 0
fi

origin="${AWS_RUNNER_REPOSITORY_ORIGIN:-}"
authorization=""
if [ -n "${AWS_RUNNER_SECRET_ID:-}" ]; then
  report credential ok
  # The credential goes to the origin only, and the URL must be under it.
  case "$origin" in
  https://*/) ;;
  *)
    fail credential "the repository origin ${origin:-(none)} is not https://host[:port]/: not sending the credential"
    ;;
  esac
  case "$AWS_RUNNER_REPOSITORY_URL" in
  "$origin"?*) ;;
  *)
    fail credential "the repository URL is not under its origin ${origin:-(none)}: not sending the credential"
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
    fail credential "cannot read the checkout credential $AWS_RUNNER_SECRET_ID"
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
report clone ok
errors="$(mktemp)"
if [ -n "${AWS_RUNNER_BRANCH:-}" ]; then
  cloned=(clone --quiet --branch "$AWS_RUNNER_BRANCH" -- "$AWS_RUNNER_REPOSITORY_URL" "$workspace")
else
  cloned=(clone --quiet -- "$AWS_RUNNER_REPOSITORY_URL" "$workspace")
fi
if ! clone "${cloned[@]}" 2>"$errors"; then
  message="$(last_line "$(cat "$errors")")"
  cat "$errors" >&2
  rm -f "$errors"
  authorization=""
  delete_secret
  fail clone "git clone failed: ${message:-no message}"
fi
authorization=""
unset authorization
delete_secret
if [ -n "${AWS_RUNNER_COMMIT:-}" ]; then
  report checkout ok
  if ! git -C "$workspace" checkout --quiet --detach "$AWS_RUNNER_COMMIT" 2>"$errors"; then
    message="$(last_line "$(cat "$errors")")"
    cat "$errors" >&2
    rm -f "$errors"
    fail checkout "git checkout $AWS_RUNNER_COMMIT failed: ${message:-no message}"
  fi
fi
rm -f "$errors"
commit="$(git -C "$workspace" rev-parse HEAD)"
log "checked out $commit"
report ready ok "" "$commit"
install_idle_watcher
