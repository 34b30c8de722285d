#!/usr/bin/env bash
# Run a command against the local stack: bring the stack up, run the command, and stop the
# stack again afterwards whatever happened. A stack that was already fully up before (someone's
# `make up`) is left running. Exits with the command's exit code.
set -uo pipefail
cd "$(dirname "$0")/.."
posttrade=.venv/bin/posttrade

started_here=true
if "$posttrade" stack status >/dev/null 2>&1; then
    started_here=false
fi
stop_stack() {
    if $started_here; then "$posttrade" stack down; fi
}
# The EXIT trap runs on every way out, including a failed `up` and Ctrl-C, and keeps the
# exit status the script was leaving with.
trap stop_stack EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$posttrade" stack up || exit
# The command sees the stack the way the services do: through their config overrides.
stack_env=$("$posttrade" stack env) || exit
eval "$stack_env"
"$@"
