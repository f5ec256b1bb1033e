#!/bin/sh
# Runs the given command (tritonserver through the image's entrypoint, see
# serve/docker-compose.yml) with tritonserver's restricted-API flags appended, their keys read
# from Docker secrets (files), never from the compose file or the environment:
#   inference, metadata, model-config          need the header fintwin-api-key   (api.key)
#   model-repository, shared-memory,
#   statistics, trace, logging                 need the header fintwin-admin-key (admin.key)
# Over gRPC the header is triton-grpc-protocol-fintwin-api-key (fintwin clients send both).
set -eu

secrets="${FINTWIN_SECRETS_DIR:-/run/secrets}"

read_key() {
    key=$(tr -d ' \n\r\t' < "$secrets/$1") || { echo "cannot read the key $secrets/$1" >&2; exit 2; }
    case "$key" in
        "" | *[!A-Za-z0-9._~+/-]*)
            echo "the key $secrets/$1 must be letters, digits and ._~+/- only" >&2; exit 2 ;;
    esac
    if [ "${#key}" -lt 16 ]; then
        echo "the key $secrets/$1 is shorter than 16 characters" >&2; exit 2
    fi
    printf '%s' "$key"
}

api_key=$(read_key fintwin_api_key)
admin_key=$(read_key fintwin_admin_key)
inference="inference,metadata,model-config:fintwin-api-key=$api_key"
admin="model-repository,shared-memory,statistics,trace,logging:fintwin-admin-key=$admin_key"
exec "$@" \
    "--grpc-restricted-protocol=$inference" "--http-restricted-api=$inference" \
    "--grpc-restricted-protocol=$admin" "--http-restricted-api=$admin"
