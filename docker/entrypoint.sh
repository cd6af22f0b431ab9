#!/bin/sh
# The images' entrypoint: the token policy below, then the worker's console script, llm-worker-rbee.
# Settings come from the environment (LLM_WORKER_<NAME>, LLORCH_API_TOKEN, a TOML file
# named by LLM_WORKER_CONFIG); flags given to `docker run IMAGE ...` pass through to the worker.
#
# The image listens on 0.0.0.0 (LLM_WORKER_HOST), and the worker refuses a reachable address without an API
# token. So that a plain `docker run -p 8080:8080 IMAGE` serves without turning auth off, a container started
# without a token gets a random one, printed once to its log (`docker logs`). Deployments give theirs:
#   LLORCH_API_TOKEN=...            the token itself
#   LLORCH_API_TOKEN_FILE=/run/secrets/llm_api_token     a file holding it (Docker or Kubernetes secrets)
#   LLORCH_API_TOKEN_GENERATE=0     never generate one: a container started without a token exits with code 2
# /health, /v1/ready and /metrics answer without a token (health checks, Prometheus).
#
#   IMAGE [flags]           serve (the embedded model when no --model / LLM_WORKER_MODEL is given)
#   IMAGE convert SRC OUT   convert a SafeTensors model to GGUF
#   IMAGE COMMAND [ARGS]    run another command (e.g. sh) in the image
set -eu

# An empty variable means "not set", so that compose files can pass optional settings through as ${VAR:-}.
for name in $(env | sed -n 's/^\(LLM_WORKER_[A-Za-z0-9_]*\|LLORCH_[A-Za-z0-9_]*\|HF_[A-Za-z0-9_]*\)=$/\1/p'); do
  unset "$name"
done

case "${1:-}" in
  ""|-*) ;;                                         # flags for the worker
  convert) exec llm-worker-rbee "$@" ;;             # no server, no token
  *) exec "$@" ;;                                   # another command
esac

if [ -n "${LLORCH_API_TOKEN_FILE:-}" ]; then
  if [ ! -r "$LLORCH_API_TOKEN_FILE" ]; then
    echo "llm-worker-rbee: cannot read LLORCH_API_TOKEN_FILE=$LLORCH_API_TOKEN_FILE" >&2
    exit 2
  fi
  LLORCH_API_TOKEN=$(tr -d '\r\n' < "$LLORCH_API_TOKEN_FILE")
  export LLORCH_API_TOKEN
  if [ -z "$LLORCH_API_TOKEN" ]; then
    echo "llm-worker-rbee: LLORCH_API_TOKEN_FILE=$LLORCH_API_TOKEN_FILE is empty" >&2
    exit 2
  fi
fi

# What the worker will see: a token from a flag, env or the TOML file; the host from a flag or env.
host=${LLM_WORKER_HOST:-127.0.0.1}
token=${LLORCH_API_TOKEN:-${LLM_WORKER_API_TOKEN:-}}
config=${LLM_WORKER_CONFIG:-}
prev=
for arg in "$@"; do
  case "$prev" in
    --host) host=$arg ;;
    --config) config=$arg ;;
  esac
  case "$arg" in
    --host=*) host=${arg#--host=} ;;
    --config=*) config=${arg#--config=} ;;
    --api-token|--api-token=*) token=given ;;
  esac
  prev=$arg
done
if [ -z "$token" ] && [ -n "$config" ] && [ -r "$config" ] && grep -Eq '^[[:space:]]*api_token[[:space:]]*=' "$config"; then
  token=given
fi

case "$host" in
  127.*|localhost|::1|"[::1]") loopback=1 ;;
  *) loopback=0 ;;
esac

if [ -z "$token" ] && [ "$loopback" = 0 ]; then
  if [ "${LLORCH_API_TOKEN_GENERATE:-1}" = 0 ]; then
    echo "llm-worker-rbee: no API token: set LLORCH_API_TOKEN or LLORCH_API_TOKEN_FILE (LLORCH_API_TOKEN_GENERATE=0 forbids generating one)" >&2
    exit 2
  fi
  LLORCH_API_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
  export LLORCH_API_TOKEN
  echo "llm-worker-rbee: no API token was given (LLORCH_API_TOKEN or LLORCH_API_TOKEN_FILE), so this container made one." >&2
  echo "llm-worker-rbee: send 'Authorization: Bearer <token>' on every route but /health, /v1/ready and /metrics." >&2
  echo "llm-worker-rbee: generated API token: $LLORCH_API_TOKEN" >&2
fi

exec llm-worker-rbee "$@"
